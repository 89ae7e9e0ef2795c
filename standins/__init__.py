"""Local stand-ins for what cannot be reached from here: YouTube (generated media served over
HTTP on 127.0.0.1), and the model hub (tiny random-weight models built from the real classes).

Used by the tests and by ``make demo``. Production code never imports this package: it runs the
same code paths, pointed at the stand-ins by config.
"""
