"""Solvers: the CP-SAT engine (large neighbourhood search over one model), the greedy baseline."""

from balancer.solver.engine import EngineOptions, SolveResult, Status, solve
from balancer.solver.greedy import greedy

__all__ = ["EngineOptions", "SolveResult", "Status", "greedy", "solve"]
