"""Every access this package makes to another library's internals, one module per library.

An internal (``GradScaler._per_optimizer_states``, a DeepSpeed method patched for 0-d
parameters, ZeRO-3's ``ds_tensor`` and flat partitions, open_clip's ``parse_model_name`` and its
text tower's ``attn_mask``) can change in any release. Reaching it only here, each time through
a named function that says what it reads and why no public API does it, keeps the list short
enough to check on an upgrade: ``tests/test_compat.py`` has one test per shim that fails when the
installed library no longer has what the shim expects, and a shim whose internal is gone raises
one line naming the library's version (``_versions.missing``). Each module's docstring names the
versions its shims were written against; ``setup.py`` bounds DeepSpeed to them. Outside this
package and ``degla_fast/integrations/``, ``tests/test_structure.py`` denies any import of
DeepSpeed's or open_clip's submodules (beyond DeepSpeed's documented ZeRO API) and the internal
attributes the shims stand for.

``torch._foreach_*`` ops are not shimmed: they are the multi-tensor ops torch's own optimisers
are built from, used as such.
"""
