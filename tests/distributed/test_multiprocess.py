"""Data parallelism on CPU with gloo: several ranks must train exactly like one process.

Every case runs a script of this folder through `launch` (torchrun, 2 ranks, each rank's output kept apart and
reported when a rank fails) and compares the LoRA weights after a few SGD steps with a single-process run over the
same global batches (uneven supervised-token counts per rank).
"""

import json
import re

import pytest
import torch
from launch import HERE, launch


def _max_diff(a_dir, b_dir):
    a = torch.load(a_dir / "weights.pt")
    b = torch.load(b_dir / "weights.pt")
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _read(path):
    with open(path) as f:
        return json.load(f)


def _kl_logs(info):
    return [(e["ce_loss"], e["nontarget_kl"], e["loss"]) for e in info["log_history"] if "ce_loss" in e]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return launch("ddp_train.py", tmp_path_factory.mktemp("single"), "--batch", "4", ranks=1)


@pytest.mark.slow
@pytest.mark.parametrize("batch, accum", [(2, 1), (1, 2)], ids=["ddp", "ddp-accumulation"])
def test_ddp_trainer_equals_single_process(single, tmp_path, batch, accum):
    out = launch("ddp_train.py", tmp_path, "--batch", str(batch), "--accum", str(accum))
    assert _max_diff(single, out) < 1e-5
    ref = _kl_logs(_read(single / "logs_rank0.json"))
    ranks = [_read(out / f"logs_rank{r}.json") for r in (0, 1)]
    assert all(info["world_size"] == 2 for info in ranks)
    # The trainer registered the clean gloo teardown at exit on every rank (the script has none of its own).
    assert all(info["exit_handler"] for info in ranks)
    # ce_loss / nontarget_kl are the global values, identical on every rank and equal to the one-process run.
    assert len(ref) == 3
    for info in ranks:
        got = _kl_logs(info)
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert g == pytest.approx(r, rel=1e-5, abs=1e-6)
    assert ref[-1][1] > 0  # the KL term was live


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--chunk_bytes", "6144"], ["--ref_model"]], ids=["chunked", "ref_model"])
def test_deepspeed_zero3_trainer_equals_single_process(single, tmp_path, extra):
    # NonTargetKLTrainer itself under accelerate's DeepSpeed plugin (ZeRO-3 on DeepSpeed's CPU accelerator, gloo):
    # the same weights and logs as one process without DeepSpeed. "chunked": a chunk budget of 4 rows, so each
    # step's fused loss runs several chunks; "ref_model": the base model passed separately (its own engine).
    pytest.importorskip("deepspeed")
    out = launch("ddp_train.py", tmp_path, "--batch", "2", "--zero", "3", *extra)
    assert _max_diff(single, out) < 1e-5  # measured: 1.8e-7
    ref = _kl_logs(_read(single / "logs_rank0.json"))
    for rank in (0, 1):
        info = _read(out / f"logs_rank{rank}.json")
        zero = info["zero"]
        # DeepSpeed really ran (not a silent fall-back to DDP) and the head was an empty shard outside its uses.
        assert info["world_size"] == 2 and zero["deepspeed_enabled"] and zero["engine"] == "DeepSpeedEngine"
        assert zero["head_partitioned"]
        # The fused path ran, gathering the head once per step (3 steps), never per chunk.
        assert zero["gathers"] == 3
        if "--ref_model" in extra:
            assert zero["ref_engine"] == "DeepSpeedEngine"
        else:
            assert zero["chunks"] >= 6
        assert "ZeRO-3" in zero["precompute_blocker"]
        got = _kl_logs(info)
        assert len(got) == len(ref) == 3
        for g, r in zip(got, ref):
            assert g == pytest.approx(r, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_fsdp2_sharded_base_pass_equals_single_process(tmp_path):
    one = launch("fsdp_base_pass.py", tmp_path / "one", ranks=1)
    two = launch("fsdp_base_pass.py", tmp_path / "two")
    info = _read(two / "info.json")
    assert info["world_size"] == 2 and info["sharded"], "the parameters were not sharded"
    assert _read(one / "info.json")["losses"] == pytest.approx(info["losses"], rel=1e-5)
    assert _max_diff(one, two) < 1e-5


@pytest.mark.slow
def test_fsdp2_resharded_root_fused_equals_logits(tmp_path):
    result = _read(launch("fsdp_fused.py", tmp_path) / "result.json")
    assert all(result["dtensor"])  # the head weight was sharded when the loss read it
    assert result["fused"] == pytest.approx(result["logits"], rel=1e-5)
    assert result["max_diff"] < 1e-5


@pytest.mark.parametrize("death, code", [("sys.exit(3)", "exit code 3"), ("os.abort()", "exit code -6, SIGABRT")])
def test_launch_reports_the_failing_rank(tmp_path, death, code):
    # The helper must name the rank that died, how, and show that rank's own output first.
    script = tmp_path / "fail_on_rank1.py"
    script.write_text("import os, sys\nif os.environ['RANK'] == '1':\n"
                      "    print('rank one says goodbye', file=sys.stderr, "
                      f"flush=True)\n    {death}\n")
    with pytest.raises(AssertionError) as failure:
        launch(script, tmp_path / "out", timeout=120)
    message = str(failure.value)
    assert f"rank 1 ({code})" in message and "rank one says goodbye" in message
    # Rank 0 may still be starting when rank 1 dies, and then torchrun stops it: failed too, but listed after.
    assert message.index("===== rank 1 (FAILED)") < re.search(r"===== rank 0( \(FAILED\))? =====", message).start()


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero3", "DEEPSPEED")])
def test_example_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(HERE.parent.parent / "examples" / "accelerate" / f"{name}.yaml")
    assert config.distributed_type.name == kind



def test_release_process_groups(tmp_path):
    # Without a process group nothing happens; with a gloo group the handler is registered once and the release
    # destroys the group. Run under torchrun so the group and the atexit handler stay out of the test process.
    script = tmp_path / "release.py"
    script.write_text(
        "import json, os, sys, torch, torch.distributed as dist\n"
        "from kl_nontarget.training.clean_exit import install_exit_handler, release_process_groups\n"
        "before = [install_exit_handler(), release_process_groups()]\n"
        "dist.init_process_group('gloo')\n"
        "dist.all_reduce(torch.ones(3))\n"
        "installed = [install_exit_handler(), install_exit_handler()]\n"
        "released = release_process_groups()\n"
        "with open(os.path.join(sys.argv[1], f\"r{os.environ['RANK']}.json\"), 'w') as f:\n"
        "    json.dump({'before': before, 'installed': installed, 'released': released,\n"
        "               'initialized': dist.is_initialized()}, f)\n")
    out = launch(script, tmp_path / "out")
    for rank in (0, 1):
        assert _read(out / f"r{rank}.json") == {"before": [False, False], "installed": [True, True], "released": True,
                                                "initialized": False}
