try:  # the C module: ``signal`` builds enums on import, which takes longer than Ctrl-C may wait
    import _signal as signal  # type: ignore[import-not-found]  # typeshed has no stub for the C module
except ImportError:  # pragma: no cover - not CPython
    import signal

# Until main() installs its own handler, a Ctrl-C ends the process quietly (the shell reports 130).
signal.signal(signal.SIGINT, signal.SIG_DFL)

from tcplab.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
