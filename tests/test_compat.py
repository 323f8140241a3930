"""One test per shim of degla_fast/compat/: each fails when the installed library no longer has
(or no longer behaves as) the private internal its shim reaches into."""
from __future__ import annotations

import inspect
import re

import pytest
import torch

from degla_fast.compat import torch_amp, torch_nn, torch_optim


def _scaled_step(scaler, optimizer, param):
    optimizer.zero_grad()
    scaler.scale((param * 2.0).sum()).backward()
    scaler.unscale_(optimizer)


def test_found_inf_flags_are_the_scalers_own_and_make_it_skip():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    with pytest.raises(RuntimeError, match=re.escape(f"torch {torch.__version__}") + ".*unscale_"):
        torch_amp.found_inf_flags(scaler, optimizer)  # no unscale_ yet: no state
    _scaled_step(scaler, optimizer, param)
    flags = torch_amp.found_inf_flags(scaler, optimizer)
    assert flags and all(isinstance(f, torch.Tensor) and float(f) == 0.0 for f in flags)
    flags[0].fill_(1.0)  # a reason of our own to skip: the scaler's step must honour it
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(param.detach(), torch.ones(3)) and scaler.get_scale() < 4.0


def test_step_supports_amp_scaling_and_the_fused_step_skips_on_found_inf():
    param = torch.nn.Parameter(torch.ones(3))
    fused = torch.optim.AdamW([param], lr=0.1, fused=True)
    assert torch_optim.step_supports_amp_scaling(fused)
    assert not torch_optim.step_supports_amp_scaling(torch.optim.SGD([param], lr=0.1))
    param.grad = torch.ones(3)
    with torch_optim.found_inf_set(fused, torch.ones(())):  # what optim.skips_on_device relies on
        fused.step()
    assert torch.equal(param.detach(), torch.ones(3))
    assert not hasattr(fused, "found_inf") and not hasattr(fused, "grad_scale")  # removed, as GradScaler does
    fused.step()
    assert not torch.equal(param.detach(), torch.ones(3))


def test_set_last_lr_is_what_get_last_lr_returns():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
    torch_optim.set_last_lr(scheduler, [0.25])
    assert scheduler.get_last_lr() == [0.25]


def test_drop_compiled_forward_undoes_an_in_place_compile():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    module[0].compile()
    assert module[0]._compiled_call_impl is not None  # where torch keeps it
    torch_nn.drop_compiled_forward(module)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in module.modules())
    x = torch.randn(1, 2)
    assert torch.equal(module(x), torch.relu(module[0].forward(x)))


# DeepSpeed: a real engine needs a process group (tests/test_ema_zero3.py runs one on two CPU
# processes through these shims); here each internal is checked to be there in the expected form.


@pytest.fixture(scope="module")
def ds():
    pytest.importorskip("deepspeed")
    from degla_fast.compat import deepspeed as ds

    return ds


def test_deepspeed_is_a_version_the_shims_were_written_for(ds):
    import deepspeed

    assert ds.written_for(deepspeed.__version__), deepspeed.__version__
    assert ds.written_for("0.16.0") and ds.written_for("0.19.8+abc") and not ds.written_for("0.20.0")


def test_zero_dim_safe_broadcasts_patches_and_restores(ds):
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    before = DeepSpeedEngine._broadcast_model, Init._zero_init_param
    # The replaced bodies call these, as DeepSpeed's own do.
    assert "_convert_to_deepspeed_param" in inspect.getsource(before[1])
    assert "_get_broadcast_src_rank" in inspect.getsource(before[0])
    with ds.zero_dim_safe_broadcasts():
        assert (DeepSpeedEngine._broadcast_model, Init._zero_init_param) == (ds._broadcast_model, ds._zero_init_param)
    assert (DeepSpeedEngine._broadcast_model, Init._zero_init_param) == before


def test_broadcast_src_rank_is_deepspeeds(ds):
    from deepspeed.utils import groups

    assert callable(groups._get_broadcast_src_rank)
    assert inspect.signature(groups._get_broadcast_src_rank).parameters == {}


def test_local_fp32_fragment_reads_the_zero12_mapping(ds):
    import importlib

    linkage = importlib.import_module("deepspeed.utils.mixed_precision_linkage")
    fragment = importlib.import_module("deepspeed.utils.tensor_fragment")

    assert ds.local_fp32_fragment(torch.nn.Parameter(torch.ones(2))) is None  # not a ZeRO-1/2 parameter
    assert "lp_param._hp_mapping = get_hp_fragment_mapping(" in inspect.getsource(linkage)  # ZeRO-1/2 links it
    assert callable(fragment.get_hp_fragment_mapping)
    assert callable(getattr(fragment.tensor_fragment, "get_hp_fragment", None))

    class Mapping:
        def get_hp_fragment(self):
            return "fragment"

    param = torch.nn.Parameter(torch.ones(2))
    param._hp_mapping = Mapping()
    assert ds.local_fp32_fragment(param) == "fragment"


def test_allgather_stream_is_the_coordinators_mangled_attribute(ds):
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    assert "self.__allgather_stream" in inspect.getsource(PartitionedParameterCoordinator.__init__)
    assert ds.allgather_stream(object()) is None  # the documented fallback


def test_params_to_release_cache_and_module_stack_are_found(ds):
    from deepspeed.runtime.zero import parameter_offload

    assert isinstance(parameter_offload.FWD_MODULE_STACK, list)
    cache = ds.params_to_release_cache()
    assert cache is not None and callable(cache.cache_clear)
    module = torch.nn.Linear(1, 1)
    parameter_offload.FWD_MODULE_STACK.append(module)
    ds.release_zero3_module(module)
    assert all(m is not module for m in parameter_offload.FWD_MODULE_STACK)


def test_zero3_parameter_and_optimizer_internals_are_where_the_shims_read_them(ds):
    """What the sharded teacher and the logit_scale clamp read through compat.deepspeed: the
    attributes ZeRO-3 sets on a converted parameter and its optimiser's partitions (a real
    partitioned engine runs in tests/test_ema_zero3.py)."""
    from deepspeed.runtime.zero import parameter_offload, partition_parameters, stage3

    converted = inspect.getsource(partition_parameters.Init._convert_to_deepspeed_param)
    for attr in ("ds_tensor", "ds_shape", "ds_numel", "ds_id", "ds_status", "ds_process_group",
                 "partition_numel", "all_gather_coalesced", "partition"):
        assert f"param.{attr} =" in converted, attr
    assert "param.ds_zero_partition_rank =" in inspect.getsource(partition_parameters)
    assert "module.ds_inflight_param_registry =" in inspect.getsource(parameter_offload)
    optimizer = inspect.getsource(stage3.DeepSpeedZeroOptimizer_Stage3)
    assert "self.fp32_partitioned_groups_flat =" in optimizer and "self.fp16_groups =" in optimizer
    assert "self.offload_optimizer =" in optimizer
    offload = inspect.signature(parameter_offload.DeepSpeedZeRoOffload)
    assert {"timers", "ds_config", "overlap_comm", "param_persistence_threshold", "mpu"} <= set(offload.parameters)
    param = torch.nn.Parameter(torch.ones(2))
    assert not ds.is_partitioned(param)
    with pytest.raises(RuntimeError, match="DeepSpeed .* has no Parameter.ds_tensor"):
        ds.local_shard(param)  # the one-line error a shim gives when the attribute is gone
    assert ds.master_partitions(object()) is None and not ds.offloads_optimizer(object())


# open_clip


def test_open_clip_parser_and_text_tower_are_what_the_shims_repeat():
    from open_clip import CLIP

    from degla_fast.compat import open_clip as oc

    assert oc.parse_model_name("hf-hub:org/repo") == ("hf-hub", "org/repo")
    assert oc.parse_model_name("ViT-B-32") == (None, "ViT-B-32")
    # encode_text_prefix repeats CLIP.encode_text's steps on fewer positions: they must still be these.
    body = inspect.getsource(CLIP.encode_text)
    for step in ("self.token_embedding(text)", "self.positional_embedding", "attn_mask=self.attn_mask",
                 "self.ln_final(x)", "text_global_pool(x, text, self.text_pool_type", "self.text_projection"):
        assert step in body, step
    with pytest.raises(RuntimeError, match="open_clip .* has no CLIP.attn_mask"):
        oc.trims_exactly(torch.nn.Linear(1, 1))
