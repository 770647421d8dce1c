"""The benchmark harness runs end to end at a tiny size, so it cannot rot between benchmark runs."""

from __future__ import annotations

import argparse

from twisted.trial import unittest

from bench import BenchError, echo, echomemory, report
from bench.loadclient import LoadClient, percentile


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
        ordered = [i * 1000 for i in range(1, 101)]
        self.assertEqual(percentile(ordered, 50), 50)
        self.assertEqual(percentile(ordered, 99), 99)
        self.assertEqual(percentile(ordered, 100), 100)
        self.assertEqual(percentile([], 99), 0)
