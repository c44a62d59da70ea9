"""How the model replicas share GPUs: their fractions, and where Ray puts them (docs/gpu-placement.md).

Ray schedules GPU fractions logically. Within a node it gives a fractional request (0 < f < 1) to the GPU that it
fits most tightly (best fit; the lower index on a tie), never splitting one request across GPUs, and refuses
fractions above 1 that are not whole. `place` replays that, so the placement of any replica count on any number
of GPUs can be predicted, and tested, without a GPU.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable

# a fraction that leaves every GPU exactly full: Ray keeps resources in fixed point with 4 decimals, so 1/3 is
# 0.3333 there and three of them fit one GPU
RAY_DECIMALS = 4


def gpu_fractions(roles: Iterable[str], configured: dict[str, float | None]) -> dict[str, float]:
    """Each GPU model role's fraction of a GPU: the configured one, or, where that is None (`auto`), an equal share
    of one GPU among the roles the graph has, two at least. So one GPU holds one replica of every role
    (Detector and Segmenter 0.5 each; with a Tracker a third each), and a graph of one model role still puts
    two replicas on a GPU, where one's CPU work overlaps the other's GPU work."""
    roles = list(roles)
    share = math.floor(10**RAY_DECIMALS / max(2, len(roles))) / 10**RAY_DECIMALS
    return {role: share if configured.get(role) is None else configured[role] for role in roles}


def fraction_problem(name: str, value: float) -> str:
    """Why Ray would refuse `value` GPUs for one replica, or ""."""
    if value > 1 and value != int(value):
        return f"{name}={value:g}: above 1 a replica's GPUs must be a whole number (Ray refuses {value:g})"
    return ""


@dataclass
class Placement:
    """Where each replica went: `gpus[node][gpu]` lists the roles on that GPU; `pending` what fitted nowhere."""

    gpus: list[list[list[str]]]
    pending: list[str] = field(default_factory=list)

    def per_gpu(self) -> list[Counter]:
        """Role counts of every GPU, node by node."""
        return [Counter(roles) for node in self.gpus for roles in node]


def _fixed(value: float) -> Fraction:
    return Fraction(round(value * 10**RAY_DECIMALS), 10**RAY_DECIMALS)


def place(replicas: Iterable[tuple[str, float]], gpus_per_node: list[int]) -> Placement:
    """Place `replicas` ((role, GPU fraction) in the order Serve starts them) on nodes with `gpus_per_node` GPUs.

    Across nodes Serve spreads replicas (its default strategy, round robin over the nodes they fit on): modelled
    as the node holding the fewest replicas so far, the lower index on a tie. Within a node,
    best fit, as Ray's raylet assigns GPU instances: that part is exact."""
    free = [[Fraction(1)] * count for count in gpus_per_node]
    placement = Placement(gpus=[[[] for _ in range(count)] for count in gpus_per_node])
    for role, fraction in replicas:
        demand = _fixed(fraction)
        candidates = []
        for node, instances in enumerate(free):
            chosen = _fit(instances, demand)
            if chosen is not None:
                held = sum(len(roles) for roles in placement.gpus[node])
                candidates.append((held, node, chosen))
        if not candidates:
            placement.pending.append(role)
            continue
        _, node, chosen = min(candidates)
        for gpu in chosen:
            free[node][gpu] -= min(demand, Fraction(1))
            placement.gpus[node][gpu].append(role)
    return placement


def _fit(instances: list[Fraction], demand: Fraction) -> list[int] | None:
    """The GPU instances a request takes on one node, or None: whole GPUs for whole demands, else best fit."""
    if demand >= 1:
        whole = [gpu for gpu, available in enumerate(instances) if available == 1]
        return whole[:int(demand)] if len(whole) >= demand else None
    fitting = [(available - demand, gpu) for gpu, available in enumerate(instances) if available >= demand]
    return [min(fitting)[1]] if fitting else None


@dataclass(frozen=True)
class Prediction:
    """Tasks/s a number of GPUs gives, from one GPU's measured service rate, and the ingress replicas it needs."""

    gpus: int
    gpu_tasks_per_s: float
    ingress_replicas: int
    tasks_per_s: float


def predict(gpus: int, per_gpu_tasks_per_s: float, ingress_cpu_s_per_task: float, ingress_busy: float = 0.7,
            ingress_replicas: int | None = None) -> Prediction:
    """One set of model replicas per GPU scales the GPU side linearly (the replicas share nothing but the ingress);
    each ingress replica runs its Python on one core, so it adds `ingress_busy / ingress_cpu_s_per_task` tasks/s
    at most. Without `ingress_replicas`, the fewest that keep the ingress above the GPUs' rate."""
    gpu_rate = gpus * per_gpu_tasks_per_s
    per_ingress = ingress_busy / ingress_cpu_s_per_task
    needed = max(1, math.ceil(gpu_rate / per_ingress))
    ingress = needed if ingress_replicas is None else ingress_replicas
    return Prediction(gpus=gpus, gpu_tasks_per_s=round(gpu_rate, 1),
                      ingress_replicas=ingress, tasks_per_s=round(min(gpu_rate, ingress * per_ingress), 1))


# one H100, session 11 (docs/performance.md): the service with Grounding DINO 800 px + MobileSAM, 20 boxes and
# masks, fp32; and the ingress's CPU per task from the null-model ceiling (session 14, 2-core VM)
MEASURED_TASKS_PER_GPU_S = 11.9
MEASURED_INGRESS_CPU_S = 0.0137


def report(gpus_per_node: list[int], roles: list[str], per_gpu_tasks_per_s: float = MEASURED_TASKS_PER_GPU_S,
           ingress_cpu_s_per_task: float = MEASURED_INGRESS_CPU_S) -> list[str]:
    """What `grounded-serve gpu-plan` prints: one set of replicas per GPU placed as Ray would, the tasks/s that
    predicts, and the Serve config that lets autoscaling reach it."""
    gpus = sum(gpus_per_node)
    fractions = gpu_fractions(roles, dict.fromkeys(roles))
    placement = place(replicas_in_sets(fractions, gpus), gpus_per_node)
    prediction = predict(gpus, per_gpu_tasks_per_s, ingress_cpu_s_per_task)
    lines = [f"{gpus} GPU(s) on {len(gpus_per_node)} node(s); fractions (auto): "
             + ", ".join(f"{role} {fraction:g}" for role, fraction in fractions.items())]
    for node, node_gpus in enumerate(placement.gpus):
        for gpu, held in enumerate(node_gpus):
            lines.append(f"  node {node} GPU {gpu}: {', '.join(held) or '-'}")
    if placement.pending:
        lines.append(f"  waiting for a GPU: {', '.join(placement.pending)}")
    lines += [f"predicted: {prediction.tasks_per_s:g} tasks/s ({per_gpu_tasks_per_s:g} a GPU, measured on one H100 "
              f"with Grounding DINO + MobileSAM; the ingress needs {prediction.ingress_replicas} replica(s) at "
              f"{ingress_cpu_s_per_task * 1000:g} ms of CPU a task)",
              "configs/serve.yaml for it: " + "; ".join(
                  [f"{role} autoscaling_config.max_replicas: {gpus}" for role in roles]
                  + [f"Ingress num_replicas: {prediction.ingress_replicas}"])]
    return lines


def replicas_in_sets(fractions: dict[str, float], sets: int) -> list[tuple[str, float]]:
    """`sets` replicas of every role, a set at a time, as a cluster scaled up under even load starts them."""
    return [(role, fraction) for _ in range(sets) for role, fraction in fractions.items()]
