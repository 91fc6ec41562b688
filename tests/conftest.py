"""Test setup: several fake CPU devices (for the tests that ask for them), strict dtype
promotion, fp32 determinism, and one persistent compilation cache for every test worker and the
CLI runs the tests start."""

import os

import jax
import pytest

# The suite is compile-bound (hundreds of small round programs): LLVM's optimization level 0
# compiles them faster and runs them a little slower. Measured on the 2-core machine, the same
# hour, empty caches: tests/test_combinations.py's scaffold and fedprox cells 13.2 s -> 8.7 s; a
# mix of compile- and run-bound tests (the 200-round default run, fault injection, four
# algorithms' contract cases, -n2) 174 s -> 150 s. Results are the same programs' (every test
# passes either way; none compares against numbers from a differently compiled program). Read
# when the backend starts (after this file), so it reaches the CLI subprocesses too.
OPT_LEVEL_0 = "--xla_backend_optimization_level=0"
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + OPT_LEVEL_0).strip()
# One XLA thread per test worker: the suite runs one worker per core, and two workers whose
# programs each use every core oversubscribe them. Measured on the 2-core machine, empty
# caches: test_contract + test_sweep + test_algorithms (-n2) 262 s -> 237 s; the whole suite
# (clean clone, .ci/run, 25 minutes apart, load 2.2-2.4 at the start) 774 s -> 723 s.
if os.environ.get("PYTEST_XDIST_WORKER") and "multi_thread_eigen" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + ONE_THREAD

# Several virtual CPU devices, so code paths that see the device count are exercised.
jax.config.update("jax_num_cpu_devices", 4)
# Implicit promotions (say float32 * float64 array) are bugs in a simulator; make them errors.
jax.config.update("jax_numpy_dtype_promotion", "strict")


# Many tests build the same small round programs (default:smoke and its variants), in
# different workers and in CLI subprocesses; XLA's persistent cache compiles each once. A
# cached executable is the one XLA would compile again (the key is the program, the devices,
# the flags and the versions), so results are unchanged; measured on the 2-core machine, a
# repeated 4-round smoke run took 2.2-3.0 s instead of 4.6-5.4 s. It lives beside the data
# cache (``$FEDJAX_SIM_CACHE``, else ``~/.cache/fedjax_sim``), so a later run of the suite on
# the same machine starts warm (the whole suite in a clean clone on the 2-core machine: 534 s
# for 105ff62 with a warm cache, 722-861 s from empty caches the same day). No size bound:
# JAX's bound needs the filelock package, and without it every cache read and write fails (with
# the warnings filtered below, silently). The environment variables reach the subprocesses
# (JAX reads JAX_* flags at import).
def _cache_dir() -> str:
    from fedjax_sim.data.files import default_cache_dir  # after the flags above are set

    return str(default_cache_dir() / "xla_tests")


_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache_dir())
# strategy = "auto" by the fixed rule, not a timing of every candidate in every test (and
# subprocess) that leaves it at auto: tests/test_autotune.py measures, with its own cache.
os.environ.setdefault("FEDJAX_SIM_AUTO", "rule")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Start the backend now: a test calling the CLI's main() in-process would otherwise set the
# worker's device count first (its cpu_devices), and later tests in that worker would see 2
# devices instead of 4 (tests/test_sweep.py's device-split cases failed that way).
jax.devices()


@pytest.fixture(autouse=True, scope="session")
def _one_device_unless_asked():
    """``num_devices=0`` ("all local devices") means one device in the tests, unless a test is
    marked ``all_devices``; tests that pass a count (``num_devices=2``, ``client_mesh(4)``,
    the contract's device cases) get what they ask for. Sharding every small round over 4
    virtual devices on a 2-core machine made the suite compile and run SPMD programs it did not
    need: measured on the 2-core machine, test_combinations + test_sweep + test_simulation
    (-n2, empty caches) took 374 s on 4 devices and 288 s on 1."""
    from fedjax_sim.core import execution

    every_device = execution.default_num_devices
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(execution, "default_num_devices", lambda: 1)
        yield every_device


@pytest.fixture(autouse=True)
def _all_devices_where_marked(request, monkeypatch, _one_device_unless_asked):
    if request.node.get_closest_marker("all_devices"):
        from fedjax_sim.core import execution

        monkeypatch.setattr(execution, "default_num_devices", _one_device_unless_asked)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The slowest tests (pytest --durations, 2-core machine, 2026-12-07: 20-90 s each, most of
# them subprocesses), and every test marked slow, start first: with xdist's load scheduling a
# long test collected late can leave one worker finishing it alone while the other idles.
SLOW_FIRST = {
    "test_two_processes_prepare_mnist_into_one_cache",
    "test_random_kills_and_damaged_checkpoints_still_end_bitwise_equal",
    "test_sweep_sigkill_and_resume_is_bitwise_identical",
    "test_sigkill_and_resume_is_bitwise_identical",
    "test_in_process_resume_extends_num_rounds",
    "test_default_run_reaches_accuracy_far_above_chance",
    "test_every_script_prints_its_usage_when_run_as_the_readme_shows",
    "test_every_model_family_shards_over_devices",
    "test_partition_seed_sweep_on_real_mnist_is_one_program_over_one_copy",
    "test_real_cifar10_jpeg_counts",
}


def pytest_collection_modifyitems(config, items):
    def later(item):
        return not (item.get_closest_marker("slow") or item.originalname in SLOW_FIRST)

    items.sort(key=later)  # stable: the rest keep their order
