"""jaxdiff.distributed: process shares, initialize's arguments, and a real two-process run."""

import os
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxdiff.distributed as dist
from jaxdiff.sampling import image_keys

REPO = Path(__file__).resolve().parents[1]
SD_TINY = REPO / "tests" / "reference" / "pipelines_stable_diffusion" / "sd_tiny"
CHILD_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- process_share
@pytest.mark.parametrize(
    ("n", "count", "expected"),
    [
        (3, 2, [(0, 2), (2, 3)]),
        (5, 3, [(0, 2), (2, 4), (4, 5)]),
        (6, 3, [(0, 2), (2, 4), (4, 6)]),
        (1, 3, [(0, 1), (1, 1), (1, 1)]),
        (0, 2, [(0, 0), (0, 0)]),
        (7, 1, [(0, 7)]),
    ],
)
def test_process_share_exact_blocks(n, count, expected):
    got = [process_share_tuple(n, p, count) for p in range(count)]
    assert got == expected


def process_share_tuple(n, p, count):
    s = dist.process_share(n, process_index=p, process_count=count)
    assert s.step is None
    return (s.start, s.stop)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 8, 13, 64, 100])
def test_process_share_tiles_and_balances(n, count):
    shares = [dist.process_share(n, p, count) for p in range(count)]
    covered = [i for s in shares for i in range(n)[s]]
    assert covered == list(range(n))  # contiguous, in process order, no overlap, no gap
    sizes = [s.stop - s.start for s in shares]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger blocks go to the first processes


def test_process_share_defaults_and_errors():
    assert jax.process_count() == 1
    assert dist.process_share(4) == slice(0, 4)
    assert dist.split_for_process(["a", "b", "c"]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="process_index must be in"):
        dist.process_share(4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="n_items"):
        dist.process_share(-1)
    with pytest.raises(ValueError, match="process_count"):
        dist.process_share(4, process_index=0, process_count=0)


# ----------------------------------------------------------------------------- initialize
@pytest.fixture
def fake_jax_init(monkeypatch):
    """Replaces jax.distributed.initialize by a recorder (this test process stays single)."""
    calls = []
    state = {"initialized": False}

    def fake_initialize(**kwargs):
        calls.append({**kwargs, "collectives": jax.config.jax_cpu_collectives_implementation})
        state["initialized"] = True

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["initialized"])
    for name in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    before = jax.config.jax_cpu_collectives_implementation
    yield calls, state
    jax.config.update("jax_cpu_collectives_implementation", before)


def test_initialize_passes_arguments_through(fake_jax_init):
    calls, _ = fake_jax_init
    dist.initialize("10.0.0.1:1234", 2, 1, local_device_ids=[0], initialization_timeout=5)
    assert calls == [
        {
            "coordinator_address": "10.0.0.1:1234",
            "num_processes": 2,
            "process_id": 1,
            "local_device_ids": [0],
            "initialization_timeout": 5,
            "collectives": "gloo",
        }
    ]


def test_initialize_auto_detect_and_env_fallback(fake_jax_init, monkeypatch):
    calls, state = fake_jax_init
    dist.initialize()  # nothing given: JAX's own cluster detection decides
    assert calls[-1]["coordinator_address"] is None
    assert calls[-1]["num_processes"] is None and calls[-1]["process_id"] is None
    state["initialized"] = False
    monkeypatch.setenv(dist.ENV_COORDINATOR, "host-0:999")
    monkeypatch.setenv(dist.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(dist.ENV_PROCESS_ID, "3")
    dist.initialize()
    assert (calls[-1]["coordinator_address"], calls[-1]["num_processes"]) == ("host-0:999", 4)
    assert calls[-1]["process_id"] == 3
    state["initialized"] = False
    dist.initialize("other:1", 2, 0)  # explicit arguments win over the environment
    assert calls[-1]["coordinator_address"] == "other:1"
    assert (calls[-1]["num_processes"], calls[-1]["process_id"]) == (2, 0)
    monkeypatch.setenv(dist.ENV_NUM_PROCESSES, "four")
    state["initialized"] = False
    with pytest.raises(ValueError, match="JAXDIFF_NUM_PROCESSES must be an int"):
        dist.initialize()


def test_initialize_is_idempotent(fake_jax_init):
    calls, _ = fake_jax_init
    dist.initialize("127.0.0.1:1234", 1, 0)
    dist.initialize("127.0.0.1:1234", 1, 0)
    dist.initialize()
    assert len(calls) == 1  # jax.distributed.initialize would raise on a second call
    # This test process is process 0 of 1: a second call claiming otherwise is an error.
    with pytest.raises(ValueError, match="already running as process 0 of 1"):
        dist.initialize("127.0.0.1:1234", 2, 1)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("127.0.0.1:1", 2, None), "num_processes was given without process_id"),
        (("127.0.0.1:1", None, 0), "process_id was given without num_processes"),
        (("127.0.0.1:1", 2, 2), r"process_id must be in \[0, num_processes\)"),
        (("127.0.0.1:1", 0, 0), "num_processes must be an int >= 1"),
        (("127.0.0.1:1", 2, -1), "process_id must be an int >= 0"),
        (("127.0.0.1:1", 2.0, 0), "num_processes must be an int >= 1"),
        (("127.0.0.1:1", True, 0), "num_processes must be an int >= 1"),
        (("127.0.0.1", 2, 0), "coordinator_address must be 'host:port'"),
        ((":1234", 2, 0), "coordinator_address must be 'host:port'"),
    ],
)
def test_initialize_bad_arguments(fake_jax_init, args, match):
    calls, _ = fake_jax_init
    with pytest.raises(ValueError, match=match):
        dist.initialize(*args)
    assert calls == []


def test_initialize_cpu_collectives(fake_jax_init, monkeypatch):
    calls, state = fake_jax_init
    jax.config.update("jax_cpu_collectives_implementation", None)
    dist.initialize("127.0.0.1:1", 1, 0)
    assert calls[-1]["collectives"] == "gloo"  # set before JAX builds the CPU client
    state["initialized"] = False
    jax.config.update("jax_cpu_collectives_implementation", "mpi")
    dist.initialize("127.0.0.1:1", 1, 0)
    assert calls[-1]["collectives"] == "mpi"  # an explicit choice is kept


def test_initialize_undetected_cluster_message(monkeypatch, fake_jax_init):
    def no_cluster(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    with pytest.raises(ValueError, match="No cluster was detected.*JAXDIFF_COORDINATOR"):
        dist.initialize()


# ----------------------------------------------------------------------------- gather / generate
def test_gather_images_single_process_is_identity():
    x = np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3)
    np.testing.assert_array_equal(dist.gather_images(x), x)
    with pytest.raises(ValueError, match="leading batch axis"):
        dist.gather_images(np.float32(1.0))


class _KeyEchoPipe:
    """Records each call; image b is key_data(keys[b]) so tests can see which keys ran."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, key, output_type, **kwargs):
        self.calls.append({"prompt": prompt, "key": key, "output_type": output_type, **kwargs})
        images = np.asarray(jax.random.key_data(key), np.float32)[:, None, None, :]
        return type("Out", (), {"images": images})()


def _as_process(monkeypatch, index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(dist, "gather_images", lambda x: x)  # this process's part only


def test_generate_splits_images_keys_and_per_image_arguments(monkeypatch):
    key = jax.random.key(7)
    keys = image_keys(key, 6)
    latents = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1)
    pipe = _KeyEchoPipe()
    _as_process(monkeypatch, 1, 2)
    out = dist.generate(
        pipe,
        ["a", "b", "c"],
        key,
        num_images_per_prompt=2,
        negative_prompt=["na", "nb", "nc"],
        latents=latents,
        num_inference_steps=2,
    )
    # 6 images [a a b b c c] over 2 processes: process 1 makes images 3, 4, 5.
    (call,) = pipe.calls
    assert call["prompt"] == ["b", "c", "c"]
    assert call["negative_prompt"] == ["nb", "nc", "nc"]
    np.testing.assert_array_equal(call["latents"], latents[3:])
    assert call["output_type"] == "np" and call["num_inference_steps"] == 2
    expected = np.asarray(jax.random.key_data(keys[3:]), np.float32)[:, None, None, :]
    np.testing.assert_array_equal(out, expected)


def test_generate_empty_share_makes_a_throwaway_image(monkeypatch):
    pipe = _KeyEchoPipe()
    _as_process(monkeypatch, 3, 4)
    out = dist.generate(pipe, ["a", "b", "c"], jax.random.key(0), negative_prompt="n")
    assert out.shape == (0, 1, 1, 2)  # trailing shape known, so gather_images can pad
    (call,) = pipe.calls
    assert call["prompt"] == ["a"] and call["negative_prompt"] == "n"


def test_generate_argument_errors():
    pipe = _KeyEchoPipe()
    with pytest.raises(ValueError, match="output_type"):
        dist.generate(pipe, ["a"], jax.random.key(0), output_type="pil")
    with pytest.raises(ValueError, match="negative_prompt has 1 entries for 2 prompts"):
        dist.generate(pipe, ["a", "b"], jax.random.key(0), negative_prompt=["n"])
    with pytest.raises(ValueError, match="latents must hold one entry per image"):
        dist.generate(pipe, ["a", "b"], jax.random.key(0), latents=np.zeros((1, 2, 2, 4)))
    with pytest.raises(TypeError, match="seed"):
        dist.generate(pipe, ["a"], jax.random.key(0), seed=0)
    assert pipe.calls == []


# ----------------------------------------------------------------------------- two processes
CHILD = textwrap.dedent(
    """
    import sys
    import warnings

    import jax
    import numpy as np

    import jaxdiff.distributed as dist
    from jaxdiff.pipelines import DiffusionPipeline

    port, pid, out, sd_tiny = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    address = f"127.0.0.1:{port}"
    dist.initialize(address, 2, pid, coordinator_bind_address=address, initialization_timeout=120)
    dist.initialize(address, 2, pid)  # idempotent
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

    # gather_images with unequal and empty shares, and a shape mismatch seen by both processes.
    rows = np.arange(10, dtype=np.int32).reshape(5, 2)
    gathered = {n: dist.gather_images(rows[:n][dist.process_share(n)]) for n in (1, 2, 5)}
    try:
        dist.gather_images(np.zeros((1, pid + 1), np.float32))
        mismatch = ""
    except ValueError as err:
        mismatch = str(err)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sd_tiny's clip_sample note
        pipe = DiffusionPipeline.from_pretrained(sd_tiny)
    images = dist.generate(
        pipe, ["a", "b", "c"], jax.random.key(0), num_inference_steps=2, progress=False
    )
    share = dist.process_share(3)
    np.savez(
        out,
        images=images,
        process_count=jax.process_count(),
        process_index=jax.process_index(),
        share=np.array([share.start, share.stop]),
        gathered_1=gathered[1],
        gathered_2=gathered[2],
        gathered_5=gathered[5],
        mismatch=np.array(mismatch),
    )
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_two_processes_matches_single_process(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXDIFF_")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = [sys.executable, str(script), str(port), str(pid), str(tmp_path / f"{pid}.npz")]
        cmd.append(str(SD_TINY))
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    # The single-process reference, computed while the children run.
    from jaxdiff.pipelines import DiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pipe = DiffusionPipeline.from_pretrained(SD_TINY)
    keys = image_keys(jax.random.key(0), 3)
    ref = pipe(["a", "b", "c"], key=keys, num_inference_steps=2, output_type="np", progress=False)
    ref = ref.images

    deadline = time.monotonic() + CHILD_TIMEOUT_S
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            logs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"two-process run did not finish in {CHILD_TIMEOUT_S} s (a hang)")
    for pid, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"process {pid} failed:\n{log[-4000:]}"

    results = [np.load(tmp_path / f"{pid}.npz") for pid in range(2)]
    for pid, r in enumerate(results):
        assert int(r["process_count"]) == 2 and int(r["process_index"]) == pid
        np.testing.assert_array_equal(r["gathered_1"], np.arange(2).reshape(1, 2))
        np.testing.assert_array_equal(r["gathered_2"], np.arange(4).reshape(2, 2))
        np.testing.assert_array_equal(r["gathered_5"], np.arange(10).reshape(5, 2))
        assert "different ranks, dtypes or trailing shapes" in str(r["mismatch"])
    # 3 images over 2 processes: unequal shares.
    assert results[0]["share"].tolist() == [0, 2] and results[1]["share"].tolist() == [2, 3]

    # Every process returns the same gathered array (one allgather: bit-identical).
    np.testing.assert_array_equal(results[0]["images"], results[1]["images"])
    assert ref.shape == (3, 64, 64, 3)
    # The three images differ by far more than the tolerance, so a wrong order or key shows.
    assert min(np.abs(ref[i] - ref[j]).max() for i, j in [(0, 1), (0, 2), (1, 2)]) > 0.05
    # Tolerance: the same per-image keys, but each process compiles batch 2 or 1 where the
    # reference runs batch 3; XLA:CPU's float32 kernels then round differently (measured
    # ~2e-6 on pixels in [0, 1]). 1e-5 is 5x that and far below the 0.05 gap between images.
    np.testing.assert_allclose(results[0]["images"], ref, rtol=0, atol=1e-5)
