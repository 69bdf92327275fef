"""The TPU plan (``python -m unitsface_jax.plan``): topologies, reading a compiled program,
refusing what does not fit, and one real XLA:TPU compile of the demo's step (libtpu, from
the ``plan`` extra that the ``test`` extra includes)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import tiny_backbone
from configs import demo
from unitsface_jax import plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What libtpu prints on a host without a TPU when nothing keeps it quiet.
LIBTPU_NOISE = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "libtpu", "InitGoogle",
                "Source Location Trace")


def _command(*args, timeout=900, pythonpath=str(ROOT)):
  """Runs a command line of the package with JAX_PLATFORMS unset (as a user's shell), with
  ``pythonpath`` for PYTHONPATH."""
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = pythonpath
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["v7:2x2", "v5e", "v5p:2x2x2x2", "tpu-64", ""])
def test_an_unknown_topology_names_the_generations(name):
  with pytest.raises(plan.PlanError) as error:
    plan.parse_topology(name)
  message = str(error.value)
  assert "\n" not in message
  assert all(g in message for g in ("v4", "v5e", "v5p", "v6e")) and "v5p:2x2x2" in message


def test_topologies_and_accelerator_types():
  assert plan.parse_topology("v5p:2x2x2") == ("v5p", "v5p:2x2x2")
  assert plan.parse_topology("v5e:4x4") == ("v5e", "v5e:4x4")
  assert plan.parse_topology("v4-32") == ("v4", "v4:2x2x4")
  assert plan.parse_topology("v6e-64") == ("v6e", "v6e:8x8")


# A compiled program's collectives as XLA:TPU writes them (async pairs, iota and explicit
# replica groups, tuples of operands).
HLO = """
ENTRY %main {
  %all-reduce-start.1 = (f32[512]{0}, bf16[3,3,64,64]{3,2,1,0}) all-reduce-start(%a, %b), channel_id=1, replica_groups=[1,4]<=[4], to_apply=%add
  %all-reduce-done.1 = (f32[512]{0}, bf16[3,3,64,64]{3,2,1,0}) all-reduce-done(%all-reduce-start.1)
  %all-reduce.2 = f32[16]{0:T(128)S(1)} all-reduce(%get-tuple-element.886), channel_id=2, replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=1] {'axis_0','axis_1','axis_2'}, use_global_device_ids=true
  %all-gather-start = (f32[2,512]{1,0}, f32[8,512]{1,0}) all-gather-start(%f), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  %all-gather-done = f32[8,512]{1,0} all-gather-done(%all-gather-start)
  %reduce-scatter.7 = f32[2,512]{1,0} reduce-scatter(%g), channel_id=4, replica_groups={{0,1},{2,3}}, dimensions={0}, to_apply=%add
  ROOT %all-to-all = s32[4,16]{1,0} all-to-all(%h), channel_id=5, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}
}
"""


def test_collective_bytes_are_read_from_the_hlo():
  sizes, counts, traffic = plan.collective_bytes(HLO, 4)
  all_reduce = (512 * 4 + 3 * 3 * 64 * 64 * 2, 16 * 4)
  assert sizes == {"all-gather": 8 * 512 * 4, "reduce-scatter": 2 * 2 * 512 * 4,
                   "all-reduce": sum(all_reduce), "all-to-all": 4 * 16 * 4,
                   "collective-permute": 0}
  assert counts == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 2, "all-to-all": 1,
                    "collective-permute": 0}
  # Ring traffic per device: 2(n-1)/n of an all-reduce, (n-1)/n of the others; the
  # reduce-scatter's and the all-to-all's groups have 2 devices.
  assert traffic == pytest.approx(2 * 3 / 4 * sum(all_reduce) + 3 / 4 * 8 * 512 * 4
                                  + 1 / 2 * 2 * 2 * 512 * 4 + 1 / 2 * 4 * 16 * 4)


def test_hlo_dtypes_of_an_opcode():
  text = ("%c = bf16[8,56,56,64]{3,2,1,0} convolution(bf16[8,112,112,3] %x, bf16[3,3,3,64] %k)\n"
          "%d = f32[8,512]{1,0} convolution(f32[8,7,7,512] %y, f32[7,7,512,512] %w)\n"
          "%e = bf16[4,4]{1,0} dot(bf16[4,8] %p, bf16[8,4] %q)\n")
  assert plan.hlo_dtypes_of(text, "convolution") == {"bf16": 1, "f32": 1}
  assert plan.hlo_dtypes_of(text, "dot") == {"bf16": 1}


@pytest.mark.slow  # a child pytest on 8 simulated devices
def test_the_abstract_state_is_init_states_on_8_devices(multidevice_pytest):
  """tests/multidevice/test_plan_state.py: shapes, dtypes and shardings leaf for leaf."""
  multidevice_pytest("test_plan_state.py", 6, timeout=600)


def test_a_batch_that_does_not_split_over_the_chips_is_named():
  config = demo.get_config("smoke")
  config.batch_size = 6
  with pytest.raises(plan.PlanError, match=r"config.batch_size = 6 .* 4 devices of v5e:2x2"):
    plan.plan(config, "v5e:2x2")


def test_a_state_larger_than_the_chip_is_refused_without_compiling(capsys):
  """200M classes: W alone is 95 GiB per v5e chip of 4; refused from the abstract state."""
  config = demo.get_config("smoke")
  config.data.num_classes = 200_000_000
  status, result = plan.run(config, "v5e:2x2", try_levers=False)
  assert status == 2 and not result["fits"] and not result["compiled"]
  assert result["hbm_breakdown_bytes"]["head_w"] == 50_000_000 * 512 * 4
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: the config needs ") and "v5e:2x2" in err[0]


@pytest.mark.slow
def test_bad_input_is_one_line_on_the_command_line():
  for args, expected in (
      (["--topology=v9:2x2"], "is not a TPU slice"),
      (["--topology=v5e:2x2", "--config.batch_size=6"], "config.batch_size = 6"),
      (["--topology=v5e:2x2", "--config.data.num_classes=200000000", "--nolevers"],
       "error: the config needs")):
    proc = _command("-m", "unitsface_jax.plan", "--config=configs/demo.py:smoke", *args)
    assert proc.returncode == 2, (args, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], (args, proc.stderr)


# The cheapest configuration that still has the backbone (bf16 activations), the class-sharded
# head with USS and SGD, and whose FLOPs are the convolutions': the demo recipe (batch 32, 8
# per chip) with an IResNet of one block a stage (tests/tiny_backbone.py: the IR trunk's every
# layer; the command line took 58 s of CPU time against IResNet-18's 87 s, AMD EPYC). A
# quarter-width trunk or 2 images per chip is 10-20% above the analytic count (the
# element-wise work and the optimiser's update, which it leaves out).
DEMO_ARGS = ("--config=configs/demo.py", "--config.model.dtype=bfloat16",
             f"--config.model.name={tiny_backbone.IRESNET_NAME}", "--topology=v5e:2x2")


@pytest.mark.slow
def test_the_demo_step_compiles_for_a_v5e_slice(tmp_path):
  """The one XLA:TPU compile of the suite (BENCHMARKS.md, "TPU plan": its time), of the
  demo recipe with an IResNet of one block a stage (tests/plan_run.py)."""
  hlo = tmp_path / "step.hlo"
  proc = _command(str(ROOT / "tests" / "plan_run.py"), *DEMO_ARGS, "--json",
                  f"--dump_hlo={hlo}")
  assert proc.returncode == 0, proc.stderr
  assert not any(noise in proc.stderr for noise in LIBTPU_NOISE), proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in ("fits", "hbm_bytes_per_chip", "hbm_capacity_bytes", "flops_per_step_per_chip",
              "analytic_flops_per_step_per_chip", "collective_bytes", "roofline_step_s",
              "img_s_per_chip", "topology", "chips", "hosts"):
    assert key in result, key
  assert result["fits"] and (result["chips"], result["hosts"]) == (4, 1)
  assert result["hbm_capacity_bytes"] == 16 * 2**30
  breakdown = result["hbm_breakdown_bytes"]
  assert result["hbm_bytes_per_chip"] >= breakdown["backbone_params_and_stats"] > 0
  assert breakdown["head_w"] == 40 * 512 * 4 // 4  # float32, a quarter of the rows per chip
  ratio = result["flops_per_step_per_chip"] / result["analytic_flops_per_step_per_chip"]
  assert 0.9 <= ratio <= 1.1, ratio
  assert result["collective_bytes"]["all-reduce"] > 0  # the backbone's gradients
  assert result["roofline_step_s"] > 0 and result["img_s_per_chip"] > 0
  # bfloat16 activations: every convolution of the compiled program runs in bf16; the
  # head's cosines stay float32 (loss.head_dtype).
  # (XLA:TPU writes matmuls as convolutions; JAX's op names tell them apart.) The embedding
  # layer stays float32 by design, as insightface's fp16 mode keeps it (models/iresnet.py).
  text = hlo.read_text()
  convolutions = plan.hlo_dtypes_of(text, "convolution", "conv_general_dilated")
  # 13 convolutions forward (the stem; two and a downsample in each of the 4 blocks), their
  # kernel gradients and 12 input gradients: 38 with this libtpu.
  assert convolutions.get("bf16", 0) >= 26 and set(convolutions) == {"bf16"}, convolutions
  head = plan.hlo_dtypes_of(text, "convolution", "shard_map/dot_general")
  assert head and set(head) == {"f32"}, head


@pytest.mark.slow
def test_cpu_commands_stay_quiet_with_libtpu_installed(tmp_path):
  """A CPU command line on a host with libtpu and no TPU prints nothing of libtpu's."""
  pytest.importorskip("libtpu")
  script = ("from unitsface_jax import cpu_tuning; assert cpu_tuning.skip_absent_tpu(); "
            "import jax; print(jax.devices()[0].platform)")
  proc = _command("-c", script, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "cpu"
  assert not any(noise in proc.stderr for noise in LIBTPU_NOISE), proc.stderr
  # The training command line on the tests' one-convolution backbone (registered at start-up
  # by tests/launch_site/sitecustomize.py, which imports JAX without starting it, as the
  # command line's own imports do before it chooses the platform).
  proc = _command("-m", "unitsface_jax.main", "--config=configs/demo.py:smoke",
                  f"--workdir={tmp_path}", "--config.num_epochs=1", "--config.data.max_examples=16",
                  *tiny_backbone.FLAGS, "--config.compilation_cache=False",
                  "--config.eval.before_training=False",
                  pythonpath=tiny_backbone.CHILD_PYTHONPATH, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not any(noise in proc.stderr for noise in LIBTPU_NOISE), proc.stderr[-3000:]


def test_a_step_that_does_not_fit_names_the_levers_that_do(monkeypatch, capsys):
  """The refusal and the levers around the compile (``plan.plan`` replaced by a model of it
  that fits once the per-chip batch is halved or W and M are bfloat16)."""
  config = demo.get_config("smoke")

  def fake_plan(c, topology, hlo_path=None):
    del hlo_path
    if c.batch_size % 4:
      raise plan.PlanError(f"config.batch_size = {c.batch_size} does not divide over 4")
    fits = c.batch_size <= 4 or c.loss.head_dtype == "bfloat16"
    return {"topology": topology, "generation": "v5e", "chips": 4, "hosts": 1, "devices": 4,
            "devices_per_chip": 1, "batch_size": c.batch_size,
            "batch_per_host": c.batch_size, "batch_per_chip": c.batch_size / 4,
            "grad_accum_steps": c.optimizer.grad_accum_steps, "compiled": False,
            "fits": fits, "hbm_bytes_per_chip": (10 if fits else 20) * plan.GIB,
            "hbm_capacity_bytes": 16 * plan.GIB, "hbm_usable_bytes": int(14.4 * plan.GIB),
            "hbm_breakdown_bytes": {}}

  monkeypatch.setattr(plan, "plan", fake_plan)
  status, result = plan.run(config, "v5e:2x2")
  assert status == 2 and not result["fits"]
  out, err = capsys.readouterr()
  assert err.strip().splitlines() == [
      "error: the config needs 20.00 GiB of HBM per chip on v5e:2x2, 14.40 GiB usable of 16"]
  fitting = {x["flags"] for x in result["levers"] if x["fits"]}
  # Batch 8 over 4 chips: halving fits; a quarter (2 images for 4 chips) does not split.
  assert fitting == {"--config.batch_size=4 --config.optimizer.grad_accum_steps=2 (same "
                     "global batch)", "--config.loss.head_dtype=bfloat16"}
  assert "fits with: " in out and "--config.loss.head_dtype=bfloat16" in out.splitlines()[-1]
  assert not any(x["flags"].startswith("--config.model.remat") and x["fits"]
                 for x in result["levers"])


@pytest.mark.slow
def test_a_missing_libtpu_is_one_line_naming_the_extra(tmp_path):
  (tmp_path / "libtpu.py").write_text("raise ImportError('no libtpu here')\n")
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
  env.pop("JAX_PLATFORMS", None)
  proc = subprocess.run([sys.executable, "-m", "unitsface_jax.plan",
                         "--config=configs/demo.py:smoke", "--topology=v5e:2x2"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "pip install -e '.[plan]'" in lines[0], proc.stderr
