"""wendelin.core's ``wendelin.lib``: of its modules, bigfile-wendelin-alias
provides ``wendelin.lib.zodb`` (``bigfile.zodbutil``)."""
