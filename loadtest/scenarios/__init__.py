"""Scenario scripts: `python -m loadtest.scenarios {sweep,long-context,memserver-join,memserver-kill}`."""
