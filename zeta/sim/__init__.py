"""A virtual-time simulator of models sharing devices, driving zeta's router and policies.

::

    from zeta.sim import ladder_fleet, scenario, simulate

    fleet = ladder_fleet()
    workload = scenario("surge", fleet, seed=1)
    for policy in ("static", "dynamic", "oracle"):
        print(policy, simulate(fleet, workload, policy, seed=1).summary().latency.p99_s)

Models are service models (:class:`ServiceProfile`: per-call overhead, prefill per prompt token,
decode step time per busy-slot count, co-load slowdown on a shared device, jitter); the router,
the scoring kernel and the policies are zeta's own objects, fed the signals the actors feed them
live. ``"oracle"`` is a clairvoyant reference policy (:class:`OraclePolicy`), latency alone;
``"oracle_pen"`` the same with the kernel's penalties. Scenarios
(:data:`SCENARIOS`) define their loads relative to the fleet's computed capacity
(:class:`Capacity`).
"""

from __future__ import annotations

from ._engine import ORACLE as ORACLE
from ._engine import ORACLE_PEN as ORACLE_PEN
from ._engine import simulate as simulate
from ._oracle import OraclePolicy as OraclePolicy
from ._profile import Fleet as Fleet
from ._profile import ServiceProfile as ServiceProfile
from ._profile import SimModel as SimModel
from ._profile import gpu_fleet as gpu_fleet
from ._profile import ladder_fleet as ladder_fleet
from ._profile import linear_steps as linear_steps
from ._profile import load_fleet as load_fleet
from ._scenarios import SCENARIOS as SCENARIOS
from ._scenarios import Capacity as Capacity
from ._scenarios import Scenario as Scenario
from ._scenarios import scenario as scenario
from ._scenarios import surge_loads as surge_loads
from ._stats import Interval as Interval
from ._stats import Latency as Latency
from ._stats import SimResult as SimResult
from ._stats import SimSummary as SimSummary
from ._workload import Shape as Shape
from ._workload import SimRequest as SimRequest

__all__ = (
    "ORACLE",
    "ORACLE_PEN",
    "SCENARIOS",
    "Capacity",
    "Fleet",
    "Interval",
    "Latency",
    "OraclePolicy",
    "Scenario",
    "ServiceProfile",
    "Shape",
    "SimModel",
    "SimRequest",
    "SimResult",
    "SimSummary",
    "gpu_fleet",
    "ladder_fleet",
    "linear_steps",
    "load_fleet",
    "scenario",
    "simulate",
    "surge_loads",
)
