"""The benchmark harness runs end to end at a tiny size, so it cannot rot between benchmark runs."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

from bench import BenchError, charts, chat, echo, echomemory, fullreport, report, servers
from bench.loadclient import BuildFailed, LoadClient, findCompiler, percentile
from bench.report import TIMES
from tests.support import scratch


def options(workload: object, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    workload.addArguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(argv)


class EchoBenchTests(unittest.TestCase):
    def test_echoWorkloadAgainstTcplabAndPlainTwisted(self) -> None:
        """A 0.3 s, 2-connection run gives a row per server with req/s, latency and a ratio
        against the plain Twisted echo, and the report shows them as a markdown table."""
        argv = "--seconds 0.3 --warmup 0.1 --connections 2 --rounds 1 --retries 0 --servers tcplab,twisted"
        opts = options(echo, *argv.split())
        client = LoadClient.choose()
        try:
            rows = echo.run(opts)
        except BenchError as e:
            if client.kind == "python":
                raise unittest.SkipTest(f"no C compiler, and the Python load client failed too: {e}") from None
            raise
        self.assertEqual([row["name"] for row in rows], ["tcplab", "twisted"])
        for row in rows:
            self.assertGreater(row["rps"], 0)
            self.assertGreater(row["p99_us"], 0)
            self.assertGreaterEqual(row["p99_us"], row["p50_us"])
            self.assertGreater(row["peak_rss_mib"], 0)
        self.assertEqual(rows[1]["rps_ratio"], 1.0)
        self.assertAlmostEqual(rows[0]["rps_ratio"], rows[0]["rps"] / rows[1]["rps"])
        text = report.render("echo", ["echo", "--seconds", "0.3"], report.machineInfo(), [echo.section(rows, opts)])
        self.assertIn("| tcplab-echo |", text)
        self.assertIn("req/s vs plain Twisted", text)
        self.assertIn(f"1.00{report.TIMES}", text)
        self.assertIn("`python -m bench echo --seconds 0.3`", text)

    def test_echoMemoryWorkload(self) -> None:
        """Pushing a few MiB without reading into tcplab-echo: little growth, every byte back."""
        opts = options(echomemory, "--push", "4", "--stall", "0.3", "--servers", "tcplab")
        (row,) = echomemory.run(opts)
        self.assertTrue(row["verified"])
        self.assertEqual(row["echoed_mib"], 4)
        self.assertLess(row["growth_mib"], 64)


class ReportTests(unittest.TestCase):
    def test_ratiosFromMedians(self) -> None:
        """Each figure is the median over rounds; ratios divide medians, and a missing baseline gives none."""
        runs = {
            "tcplab": [
                dict(rps=r, p50_us=1.0, p99_us=p, p999_us=p, server_cpu=1.0, client_cpu=0.5, cpu_us_per_request=10.0)
                for r, p in ((90, 30), (110, 10), (100, 20))
            ],
            "twisted": [
                dict(
                    rps=r,
                    p50_us=1.0,
                    p99_us=40.0,
                    p999_us=40.0,
                    server_cpu=1.0,
                    client_cpu=0.5,
                    cpu_us_per_request=10.0,
                )
                for r in (40, 50, 500)
            ],
        }
        specs = [echo.SERVERS["tcplab"], echo.SERVERS["twisted"]]
        client = LoadClient("c", ("loadclient",))
        rows = echo.summarize(specs, runs, {"tcplab": 1 << 20, "twisted": 1 << 20}, client)
        self.assertEqual((rows[0]["rps"], rows[0]["p99_us"]), (100, 20))
        self.assertEqual(rows[0]["rps_ratio"], 2.0)
        self.assertEqual(rows[0]["p99_ratio"], 0.5)
        self.assertEqual(rows[0]["disturbed"], 0)
        alone = echo.summarize(specs[:1], runs, {"tcplab": 1 << 20}, client)
        self.assertIsNone(alone[0]["rps_ratio"])
        self.assertIn("| tcplab-echo | 100 | — |", report.markdownTable(echo.COLUMNS, alone))

    def test_percentileIsNearestRank(self) -> None:
        """Bench percentiles take the nearest rank of nanosecond samples and report microseconds, as the C client
        does, and an empty sample reports zero."""
        ordered = [i * 1000 for i in range(1, 101)]
        self.assertEqual(percentile(ordered, 50), 50)
        self.assertEqual(percentile(ordered, 99), 99)
        self.assertEqual(percentile(ordered, 100), 100)
        self.assertEqual(percentile([], 99), 0)


LOSSY_SERVER = r"""
import asyncio, sys

async def main(port):
    clients = []

    async def handle(reader, writer):
        clients.append(writer)
        number = 0
        try:
            while line := await reader.readline():
                number += 1
                if number % 100 == 50:
                    continue  # drops one line in a hundred
                for other in clients:
                    if other is not writer:
                        other.write(line)
        finally:
            clients.remove(writer)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()

asyncio.run(main(int(sys.argv[1])))
"""


class ChatClientTests(unittest.TestCase):
    """The C chat client's checks mean something: a server that drops lines is caught."""

    def setUp(self) -> None:
        try:
            self.client = chat.ChatClient.build()
        except BuildFailed as e:
            raise unittest.SkipTest(f"no C compiler for the chat client: {e}") from None

    def test_fanoutCatchesALossyServer(self) -> None:
        """Against a relay that drops every hundredth line, listeners report the gaps and "in order" is false."""
        lossy = chat.ChatServer(
            servers.ServerSpec("lossy", "lossy relay", lambda port: [sys.executable, "-c", LOSSY_SERVER, str(port)]),
            echoes=False,
        )
        with tempfile.TemporaryDirectory() as workdir, servers.running([lossy.spec], Path(workdir)) as (running,):
            result = self.client.fanout(lossy, running.port, 2, 1000, 64, 100, stall=1.0, deadline=20.0)
        self.assertFalse(result["in_order"])
        self.assertGreater(result["gaps"], 0)
        self.assertLess(result["delivered"], result["expected"])

    def test_missingProgramIsSkippedNotFaked(self) -> None:
        """A peer whose program is not installed is left out, with a note naming the program."""
        absent = chat.ChatServer(
            servers.ServerSpec("absent", "absent peer", lambda port: ["tcplab-no-such-program", str(port)]),
            echoes=False,
            program="tcplab-no-such-program",
        )
        chosen, notes = chat.chooseServers(["absent"], {"absent": absent}, lambda line: None)
        self.assertEqual(chosen, [])
        self.assertEqual(len(notes), 1)
        self.assertIn("`tcplab-no-such-program` is not installed", notes[0])


class FullReportTests(unittest.TestCase):
    def test_spliceKeepsTheHandWrittenText(self) -> None:
        """Only the part between the markers is replaced; without markers the results are appended."""
        start, end = fullreport.RESULTS_START, fullreport.RESULTS_END
        text = f"# Bench\n\nintro\n\n{start}\nold figures\n{end}\n\n## Reading\nprose\n"
        spliced = fullreport.splice(text, "## Results\nnew figures\n")
        self.assertIn("intro", spliced)
        self.assertIn("## Reading\nprose", spliced)
        self.assertIn("new figures", spliced)
        self.assertNotIn("old figures", spliced)
        self.assertEqual(fullreport.splice(spliced, "## Results\nnewer\n").count(fullreport.RESULTS_START), 1)
        appended = fullreport.splice("# Bench\n", "## Results\nfigures\n")
        self.assertTrue(appended.startswith("# Bench\n"))
        self.assertIn(f"{fullreport.RESULTS_START}\n\n## Results\nfigures\n\n{fullreport.RESULTS_END}", appended)

    def test_reportAtATinySize(self) -> None:
        """``python -m bench --report --tiny`` runs the multi and file workloads in seconds and writes their
        tables, notes and (with matplotlib) charts into the results part of the page, keeping the rest."""
        folder = Path(scratch(self))
        page = folder / "benchmarks.md"
        start, end = fullreport.RESULTS_START, fullreport.RESULTS_END
        page.write_text(f"# Benchmarks\n\nhand-written\n\n{start}\n{end}\n\nend\n")
        lines: list[str] = []
        status = fullreport.main(
            ["--tiny", "--only", "storm,fanout,multi-memory,file", "--output", str(page)], lines.append
        )
        self.assertEqual(status, 0)
        text = page.read_text()
        self.assertTrue(text.startswith("# Benchmarks\n\nhand-written\n"))
        self.assertTrue(text.endswith("\nend\n"))
        self.assertIn("- Command: `python -m bench --report --tiny --only storm,fanout,multi-memory,file", text)
        for title in ("### Storm: short connections", "### Fan-out: one sender, many listeners",
                      "### Multi memory: 100 idle clients", "### Multi memory: one stuck reader while 2 MiB flows",
                      "### File: verified upload throughput"):
            self.assertIn(title, text)
        self.assertNotIn(": not measured", text)
        if chat.SOURCE.exists() and findCompiler():
            self.assertIn("| tcplab-multi |", text)
            self.assertIn("| plain Twisted chat (docs) |", text)
            self.assertRegex(text, rf"Target \(issue 4\): tcplab-multi ≥ 2{TIMES} the plain Twisted chat.*nothing lost")
        self.assertIn("| tcplab send → tcplab-file | 4 |", text)
        self.assertRegex(text, rf"\| 2{TIMES} tcplab send at once \| 2 \|.*\| yes \|")
        noCharts = charts.available()
        if noCharts:
            self.assertIn(noCharts, text)
        else:
            for name in ("storm", "fanout", "multi-memory", "file"):
                self.assertTrue((folder / "img" / f"bench-{name}.png").exists(), name)
                self.assertIn(f"(img/bench-{name}.png)", text)


class BackplaneBenchTests(unittest.TestCase):
    def test_oneProcessVsTwoOnTheBackplane(self) -> None:
        """A tiny run measures one tcplab-multi and two on one Redis backplane; every line reaches every
        listener once, in order, on both, and the table shows B's ratio to A."""
        import shutil

        from bench import backplane

        if shutil.which("redis-server") is None:
            raise unittest.SkipTest("redis-server is not installed (apt install redis-server)")
        opts = options(backplane, "--listeners", "3", "--lines", "200", "--connections", "40", "--concurrency", "5",
                       "--rounds", "1")
        rows = backplane.run(opts)
        if "skipped" in rows[0]:
            raise unittest.SkipTest(rows[0]["skipped"])
        self.assertEqual([row["nodes"] for row in rows], [1, 2])
        for row in rows:
            self.assertEqual(row["complete"], "yes")
            self.assertEqual((row["delivered"], row["storm_errors"], row["storm_lost"]), (600, 0, 0))
            self.assertGreater(row["conns_per_s"], 0)
        self.assertEqual(rows[0]["fan_ratio"], 1.0)
        text = report.render("backplane", ["backplane"], report.machineInfo(), [backplane.section(rows, opts)])
        self.assertIn("Scale-out: one process vs two on the Redis backplane", text)
        self.assertIn("| B: two tcplab-multi, --reuse-port, Redis backplane |", text)


class StormBenchTests(unittest.TestCase):
    """The storm workload measures tcplab against its equal-work plain Twisted peers at every concurrency."""

    def setUp(self) -> None:
        try:
            chat.ChatClient.build()
        except BuildFailed as e:
            raise unittest.SkipTest(f"no C compiler for the chat client: {e}") from None

    def test_stormAgainstEqualWorkPeersAtTwoConcurrencies(self) -> None:
        """A tiny storm gives a row per server and concurrency, each with its ratio to its equal-work peer."""
        from bench import storm

        opts = options(storm, "--connections", "60", "--concurrency", "4,8", "--rounds", "1", "--servers",
                       "tcplab,twisted-equal,tcplab-echo,twisted-echo")
        rows = storm.run(opts)
        self.assertEqual([(r["name"], r["concurrency"]) for r in rows], [
            (name, c) for c in (4, 8) for name in ("tcplab", "twisted-equal", "tcplab-echo", "twisted-echo")])
        for row in rows:
            self.assertEqual((row["completed"], row["errors"], row["lost"]), (60, 0, 0), row["name"])
        byName = {(r["name"], r["concurrency"]): r for r in rows}
        self.assertEqual(byName["twisted-equal", 4]["ratio"], 1.0)
        self.assertAlmostEqual(byName["tcplab-echo", 8]["ratio"],
                               byName["tcplab-echo", 8]["conns_per_s"] / byName["twisted-echo", 8]["conns_per_s"])
        text = report.render("storm", ["storm"], report.machineInfo(), [storm.section(rows, opts)])
        self.assertIn("| plain Twisted chat, equal work | 4 |", text)
        self.assertIn("Target (issue 15), tcplab-echo, 8 at a time", text)

    def test_stormInstructionsPerConnection(self) -> None:
        """Under valgrind, tcplab-echo's instructions per storm connection are counted and compared."""
        import shutil

        from bench import storminstructions

        if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
            raise unittest.SkipTest("valgrind is not installed")
        opts = options(storminstructions, "--connections", "20", "--warmup", "5", "--concurrency", "2",
                       "--servers", "tcplab-echo,twisted-echo")
        rows = storminstructions.run(opts)
        self.assertEqual([r["name"] for r in rows], ["tcplab-echo", "twisted-echo"])
        self.assertGreater(rows[0]["per_connection"], 10000)
        self.assertEqual(rows[1]["ratio"], 1.0)

    def test_missingUvloopIsANoteNotAFailure(self) -> None:
        """Without uvloop installed, the echo workload leaves its peer out with a note saying how to install it."""
        import importlib.util

        real = importlib.util.find_spec
        self.patch(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
        self.assertIn("pip install", echo.missing("uvloop"))
        self.assertEqual(echo.missing("asyncio"), "")
