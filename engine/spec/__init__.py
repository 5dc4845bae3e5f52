"""Speculative decoding: proposers (draft model, n-gram prompt lookup) suggest tokens, the
target verifies them for every running request in one forward pass (model_runner), and the
Speculator decides per request how many to propose and whether speculating pays at all."""

from .proposer import Proposal, Proposer
from .speculator import Speculator, SpecStats, build_speculator

__all__ = ["Proposal", "Proposer", "SpecStats", "Speculator", "build_speculator"]
