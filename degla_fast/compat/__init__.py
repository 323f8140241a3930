"""Every access this package makes to another library's private internals, one module per library.

A private attribute (``GradScaler._per_optimizer_states``, a DeepSpeed method patched for 0-d
parameters, a name-mangled cache) can change in any release. Reaching it only here, each time
through a named function that says what it reads and why no public API does it, keeps the
list short enough to check on an upgrade: ``tests/test_compat.py`` has one test per shim that
fails when the installed library no longer has what the shim expects. Each module's docstring
names the versions its shims were written against; ``setup.py`` bounds DeepSpeed to them.

``torch._foreach_*`` ops are not shimmed: they are the multi-tensor ops torch's own optimisers
are built from, used as such.
"""
