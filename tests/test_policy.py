"""The scheduling policy on its own: every rule of model_manager/policy.py (where, whom, when), one test each."""

from __future__ import annotations

import msgspec

from model_manager import policy
from model_manager.config import MIB, DeviceSettings, GpuBudget, ModelSpec, SchedulerSettings, Variant
from model_manager.devices import Device
from model_manager.memory import MemoryAccounting
from model_manager.policy import Decision, PlacementRequest, Resident, eviction_order, idle_expired, plan_placement
from model_manager.slots import ModelSlot

NOW = 1000.0
SETTINGS = DeviceSettings(gpu_headroom_mib=0, host_headroom_mib=0, cuda_context_mib=0)
SCHED = SchedulerSettings(hold_after_use_s=2.0, max_wait_s=10.0)


def gpu(index: int, total_mib: int, others_mib: int = 0) -> Device:
    return Device(f"cuda:{index}", "gpu", f"GPU {index}", index, total_mib * MIB, others_mib * MIB)


HOST = Device("cpu", "cpu", "host", None, 16000 * MIB, 0)


def resident(name: str, device: str, mib: int, **kw) -> Resident:
    values = dict(
        priority=50, pinned=False, busy=False, unloading=False, loading=False, last_used=0.0, load_ms=1000, demand=1.0
    )
    values.update(kw)
    return Resident(name=name, placements={device: mib * MIB}, **values)


def request(mib: int, wants_gpu: bool = True, pinned_gpu: int | None = None, waited_s: float = 0.0) -> PlacementRequest:
    return PlacementRequest("new", mib * MIB, mib * MIB, wants_gpu, pinned_gpu, waited_s)


def plan(req, devices, residents, settings=SETTINGS, sched=SCHED):
    return plan_placement(req, devices, residents, settings, sched, NOW)


def test_best_fit_is_the_gpu_with_most_free_memory() -> None:
    decision = plan(request(3000), [HOST, gpu(0, 8192, others_mib=4000), gpu(1, 6144)], [])
    assert (decision.action, decision.device_ids) == ("place", ("cuda:1",))


def test_reservations_count_as_used() -> None:
    decision = plan(request(3000), [HOST, gpu(0, 8192), gpu(1, 6144)], [resident("a", "cuda:0", 6000)])
    assert decision.device_ids == ("cuda:1",)


def test_pinned_gpu_is_the_only_candidate() -> None:
    decision = plan(request(3000, pinned_gpu=0), [HOST, gpu(0, 8192, others_mib=6000), gpu(1, 6144)], [])
    assert decision.action == "fail" and decision.free["cuda:1"] == 6144 * MIB
    missing = plan(request(10, pinned_gpu=5), [HOST, gpu(0, 8192)], [])
    assert missing.action == "fail" and "GPU 5" in missing.reason


def test_cpu_models_go_to_the_host_and_gpu_models_fall_back_to_it_when_allowed() -> None:
    assert plan(request(100, wants_gpu=False), [HOST, gpu(0, 8192)], []).device_ids == ("cpu",)
    assert plan(request(9000), [HOST, gpu(0, 8192)], []).device_ids == ("cpu",)
    strict = DeviceSettings(gpu_headroom_mib=0, host_headroom_mib=0, allow_cpu_fallback=False)
    assert plan(request(9000), [HOST, gpu(0, 8192)], [], settings=strict).action == "fail"


def test_eviction_takes_the_cheapest_first_and_only_as_many_as_needed() -> None:
    residents = [
        resident("important", "cuda:0", 3000, priority=90, last_used=1),
        resident("often-used", "cuda:0", 2000, demand=20.0, last_used=2),
        resident("rarely-used", "cuda:0", 2000, demand=1.0, last_used=3),
    ]
    decision = plan(request(2500), [gpu(0, 8192)], residents)
    assert decision.action == "evict" and decision.evict == ["rarely-used"]
    decision = plan(request(4500), [gpu(0, 8192)], residents)
    assert decision.evict == ["rarely-used", "often-used"]


def test_equal_demand_and_load_time_degrade_to_least_recently_used() -> None:
    residents = [resident("newer", "x", 1, last_used=50), resident("older", "x", 1, last_used=10)]
    assert [r.name for r in eviction_order(residents)] == ["older", "newer"]


def test_pinned_busy_and_loading_models_are_never_evicted() -> None:
    residents = [resident("pinned", "cuda:0", 8000, pinned=True)]
    assert plan(request(1000), [gpu(0, 8192)], residents).action == "fail"
    for flag in ("busy", "loading"):
        decision = plan(request(1000), [gpu(0, 8192)], [resident("m", "cuda:0", 8000, **{flag: True})])
        assert decision.action == "wait", flag


def test_a_model_that_just_served_is_held_unless_the_request_waited_too_long() -> None:
    just_used = [resident("m", "cuda:0", 8000, last_used=NOW - 0.5)]
    assert plan(request(1000), [gpu(0, 8192)], just_used).action == "wait"
    assert plan(request(1000, waited_s=11), [gpu(0, 8192)], just_used).evict == ["m"]
    long_ago = [resident("m", "cuda:0", 8000, last_used=NOW - 5)]
    assert plan(request(1000), [gpu(0, 8192)], long_ago).evict == ["m"]


def test_memory_being_released_means_wait_not_more_evictions() -> None:
    residents = [resident("going", "cuda:0", 6000, unloading=True), resident("idle", "cuda:0", 2000)]
    assert plan(request(5000), [gpu(0, 8192)], residents).action == "wait"


def test_too_big_for_everything_fails_with_what_is_free_where() -> None:
    decision = plan(request(20000), [HOST, gpu(0, 8192), gpu(1, 6144)], [])
    assert decision.action == "fail" and decision.need == 20000 * MIB
    assert decision.free == {"cpu": 16000 * MIB, "cuda:0": 8192 * MIB, "cuda:1": 6144 * MIB}


def test_split_over_gpus_only_when_allowed_and_no_single_gpu_fits() -> None:
    split = DeviceSettings(
        gpu_headroom_mib=0, host_headroom_mib=0, cuda_context_mib=0, allow_split=True, allow_cpu_fallback=False
    )
    decision = plan(request(10000), [gpu(0, 8192), gpu(1, 6144)], [], settings=split)
    assert decision.action == "place" and decision.device_ids == ("cuda:0", "cuda:1")
    assert abs(sum(decision.tensor_split) - 1.0) < 1e-3 and decision.tensor_split[0] > decision.tensor_split[1]
    assert plan(request(5000), [gpu(0, 8192), gpu(1, 6144)], [], settings=split).device_ids == ("cuda:0",)


def test_max_loaded_models_per_device() -> None:
    limited = DeviceSettings(gpu_headroom_mib=0, host_headroom_mib=0, max_loaded_models=1)
    decision = plan(request(10), [gpu(0, 8192)], [resident("a", "cuda:0", 10)], settings=limited)
    assert decision.evict == ["a"]


def test_keep_alive_rules() -> None:
    assert idle_expired(0.0, 0, pinned=False), "ttl 0 unloads after each request"
    assert not idle_expired(10_000.0, -1, pinned=False), "ttl -1 never unloads"
    assert not idle_expired(10_000.0, 5, pinned=True), "pinned models stay"
    assert idle_expired(6.0, 5, pinned=False) and not idle_expired(4.0, 5, pinned=False)


# ----- when: one rule a test ------------------------------------------------------------------------------------

TIMEOUTS = {"request_timeout_s": 60.0, "load_timeout_s": 120.0}


def facts(**overrides: object) -> policy.ModelFacts:
    base = {"name": "m", "state": "ready", "live_worker": True}
    return policy.ModelFacts(**{**base, **overrides})  # type: ignore[arg-type]


def test_a_request_past_the_request_timeout_kills_its_worker() -> None:
    late = facts(oldest_run_started=NOW - 61)
    assert policy.due([late], NOW, **TIMEOUTS) == [policy.KillWorker("m", "request_timeout")]
    assert policy.due([facts(oldest_run_started=NOW - 59)], NOW, **TIMEOUTS) == []


def test_a_load_past_the_load_timeout_kills_its_worker() -> None:
    loading = facts(state="loading", load_started=NOW - 121)
    assert policy.due([loading], NOW, **TIMEOUTS) == [policy.KillWorker("m", "load_timeout")]
    assert policy.due([facts(state="loading", load_started=NOW - 119)], NOW, **TIMEOUTS) == []


def test_a_ready_model_idle_for_its_ttl_is_unloaded_unless_pinned_or_kept_forever() -> None:
    assert policy.due([facts(idle_s=300, idle_ttl_s=300)], NOW, **TIMEOUTS) == [policy.Unload("m", "idle")]
    assert policy.due([facts(idle_s=299, idle_ttl_s=300)], NOW, **TIMEOUTS) == []
    assert policy.due([facts(idle_s=10**6, idle_ttl_s=-1)], NOW, **TIMEOUTS) == []
    assert policy.due([facts(idle_s=10**6, idle_ttl_s=0, pinned=True)], NOW, **TIMEOUTS) == []
    assert policy.due([facts(idle_s=None, idle_ttl_s=0)], NOW, **TIMEOUTS) == []  # busy: never idle


def test_a_worker_already_exiting_gets_no_second_action() -> None:
    exiting = facts(live_worker=False, oldest_run_started=NOW - 999, idle_s=999, idle_ttl_s=0)
    assert policy.due([exiting], NOW, **TIMEOUTS) == []


def test_a_request_timeout_comes_before_idleness() -> None:
    both = facts(oldest_run_started=NOW - 61, idle_s=999, idle_ttl_s=0)
    assert policy.due([both], NOW, **TIMEOUTS) == [policy.KillWorker("m", "request_timeout")]


def test_models_waiting_while_unloaded_or_failed_are_placed() -> None:
    waiting = [facts(name="a", state="unloaded", live_worker=False, waiting=True), facts(name="b", idle_s=1)]
    assert policy.due(waiting, NOW, **TIMEOUTS) == [policy.PlaceWaiting()]
    failed = facts(state="failed", live_worker=False, waiting=True)
    assert policy.due([failed], NOW, **TIMEOUTS) == [policy.PlaceWaiting()]
    assert policy.due([facts(state="unloaded", live_worker=False)], NOW, **TIMEOUTS) == []


def test_a_spare_starts_when_nothing_computes_or_once_overdue() -> None:
    assert policy.spare_due(1, None, computing=False, now=NOW) == (False, None)
    assert policy.spare_due(0, None, computing=False, now=NOW) == (True, NOW)
    assert policy.spare_due(0, None, computing=True, now=NOW) == (False, NOW)  # not beside a load or a request
    late = NOW + policy.SPARE_MAX_DELAY_S + 1
    assert policy.spare_due(0, NOW, computing=True, now=late) == (True, NOW)


def test_a_request_is_admitted_when_its_predicted_wait_fits_its_deadline() -> None:
    assert policy.admission(ahead=0, capacity=1, service_s=2.0, wait_allowed_s=0.1) is None, "a free place now"
    assert policy.admission(ahead=3, capacity=4, service_s=2.0, wait_allowed_s=0.1) is None, "a free sequence"
    assert policy.admission(ahead=5, capacity=1, service_s=None, wait_allowed_s=0.1) is None, "nothing measured"
    assert policy.admission(ahead=5, capacity=1, service_s=2.0, wait_allowed_s=None) is None, "no deadline"
    assert policy.admission(ahead=4, capacity=2, service_s=1.0, wait_allowed_s=2.5) is None  # two rounds: 2 s
    assert policy.admission(ahead=4, capacity=2, service_s=1.0, wait_allowed_s=1.5) == 0.5  # retry in 0.5 s


def test_the_service_time_follows_the_requests_served() -> None:
    assert policy.service_time(None, 3.0) == 3.0
    mean = 1.0
    for _ in range(50):
        mean = policy.service_time(mean, 5.0)
    assert 4.9 < mean <= 5.0


def test_a_gpu_budget_caps_what_the_manager_books_there_and_a_big_card_acts_small() -> None:
    big = gpu(0, 140_000)  # an H200, told to behave like an 8 GB card
    budget = DeviceSettings(
        gpu_headroom_mib=0, host_headroom_mib=0, allow_cpu_fallback=False, gpus=[GpuBudget(index=0, max_mib=8192)]
    )
    assert plan(request(5000), [HOST, big], [], settings=budget).device_ids == ("cuda:0",)
    assert plan(request(9000), [HOST, big], [], settings=budget).action == "fail"  # fits the card, not the budget
    # One 5000 MiB model fits the budget, two do not: the second evicts the first although the card has room.
    decision = plan(request(5000), [HOST, big], [resident("a", "cuda:0", 5000)], settings=budget)
    assert (decision.action, decision.evict) == ("evict", ["a"])
    assert decision.free["cuda:0"] == (8192 - 5000) * MIB
    # The budget never lends more than the card has free either.
    busy_card = gpu(0, 10_000, others_mib=6000)
    assert plan(request(5000), [HOST, busy_card], [], settings=budget).action == "fail"
    # Without the budget the same card takes both.
    assert plan(request(5000), [HOST, big], [resident("a", "cuda:0", 5000)]).action == "place"


def test_a_gpu_headroom_of_its_own_replaces_the_common_one() -> None:
    settings = DeviceSettings(
        gpu_headroom_mib=4000, host_headroom_mib=0, allow_cpu_fallback=False, gpus=[GpuBudget(index=1, headroom_mib=0)]
    )
    decision = plan(request(6000), [HOST, gpu(0, 8192), gpu(1, 6144)], [], settings=settings)
    assert decision.device_ids == ("cuda:1",)  # GPU 0 keeps 4000 MiB free; GPU 1 gives all of its 6144
    assert decision.free == {"cpu": 16000 * MIB, "cuda:0": 4192 * MIB, "cuda:1": 6144 * MIB}


def test_a_partial_offload_books_the_rest_on_the_host_and_needs_room_there() -> None:
    partial = PlacementRequest("new", 3000 * MIB, 5000 * MIB, True, None, 0.0, host_share=2000 * MIB)
    decision = plan(partial, [HOST, gpu(0, 8192)], [])
    assert (decision.action, decision.device_ids, decision.host_share) == ("place", ("cuda:0",), 2000 * MIB)
    # A host too full for the layers kept off the GPU: the GPU is no candidate; the whole model cannot go either.
    crowded = [resident("big", "cpu", 15_000)]
    decision = plan(partial, [HOST, gpu(0, 8192)], crowded)
    assert decision.action != "place" or decision.device_ids == ("cpu",)
    strict = DeviceSettings(gpu_headroom_mib=0, host_headroom_mib=0, allow_cpu_fallback=False)
    decision = plan(partial, [HOST, gpu(0, 8192)], crowded, settings=strict)
    assert decision.action == "fail" and "host has no room" in decision.reason
    # Evicting on the GPU still books the host share beside it.
    decision = plan(partial, [HOST, gpu(0, 4000)], [resident("old", "cuda:0", 3000)], settings=strict)
    assert (decision.action, decision.evict, decision.host_share) == ("evict", ["old"], 2000 * MIB)


class VariantBooks(MemoryAccounting):
    """The accounting's variant choice over given answers: each file's plan (no devices, no GGUF headers)."""

    def __init__(self, plans: dict[str, Decision]) -> None:  # the real one opens NVML and a state store
        self.plans, self.current = plans, ""

    def needs(self, slot: ModelSlot, spec: ModelSpec | None = None) -> tuple[int, int]:
        self.current = (spec or slot.spec).quantization or ""
        return (MIB, MIB)

    def plan(self, slot: ModelSlot, slots: list[ModelSlot], needs: tuple[int, int], now: float) -> Decision:
        return self.plans[self.current]


def test_the_best_variant_is_taken_unless_it_would_evict_a_model_of_higher_priority() -> None:
    variants = [Variant(quantization=q, path=f"/m/{q}.gguf") for q in ("Q8_0", "Q4_K_M", "Q2_K")]
    spec = ModelSpec(kind="llm", path="/m/Q8_0.gguf", quantization="Q8_0", variants=variants, priority=50)
    slot = ModelSlot("m", spec)
    others = [ModelSlot(name, ModelSpec(kind="llm", path=name, priority=p)) for name, p in (("low", 10), ("high", 90))]

    def chosen(**plans: Decision) -> str:
        books = VariantBooks(plans)
        return books.choose(slot, [slot, *others], NOW)[0].quantization

    place, wait = Decision("place", ("cuda:0",)), Decision("wait", ("cuda:0",))
    assert chosen(Q8_0=place, Q4_K_M=place, Q2_K=place) == "Q8_0"
    assert chosen(Q8_0=Decision("evict", ("cuda:0",), evict=["low"]), Q4_K_M=place, Q2_K=place) == "Q8_0"
    assert chosen(Q8_0=Decision("evict", ("cuda:0",), evict=["high"]), Q4_K_M=place, Q2_K=place) == "Q4_K_M"
    assert chosen(Q8_0=wait, Q4_K_M=wait, Q2_K=place) == "Q2_K"
    # None fits as asked: the smallest takes the policy's answer (here: evict the higher-priority model).
    assert chosen(Q8_0=wait, Q4_K_M=wait, Q2_K=Decision("evict", ("cuda:0",), evict=["high"])) == "Q2_K"
    pinned = ModelSlot("p", msgspec.structs.replace(spec, variant="Q8_0"))
    assert VariantBooks({"Q8_0": wait}).choose(pinned, [pinned], NOW)[0].quantization == "Q8_0"
