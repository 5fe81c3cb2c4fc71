"""Edge-vs-cloud routing: a small local classifier scores how likely the edge answer would lose.

Usage::

    from gateway.routing import default_router
    router = default_router()
    decision = router.decide([{"role": "user", "content": "Summarise this paragraph: ..."}])
    decision.tier   # "edge" or "cloud"
"""

from gateway.routing.errors import (
    ArtefactError,
    CalibrationError,
    EmptyPromptError,
    MissingDependencyError,
    RouterError,
    TrainingDataError,
)
from gateway.routing.features import FeatureExtractor, FeatureSpec
from gateway.routing.router import RouteDecision, Router, default_router, load_router

__all__ = [
    "ArtefactError",
    "CalibrationError",
    "EmptyPromptError",
    "FeatureExtractor",
    "FeatureSpec",
    "MissingDependencyError",
    "RouteDecision",
    "Router",
    "RouterError",
    "TrainingDataError",
    "default_router",
    "load_router",
]
