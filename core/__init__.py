"""posttrain: LLM post-training methods as plugins, composed by YAML recipes into TRL trainers.

The public API for plugin authors is small: subclass :class:`Plugin`, decorate hook methods
with :data:`hookimpl`, and register the class under the ``posttrain.plugins`` entry-point
group. The hooks are documented in :mod:`posttrain.hookspecs` and docs/hooks.md.
:func:`load_plugin` and :func:`score` score completions with one reward plugin outside a run.
"""

from .errors import UserError
from .hookspecs import hookimpl
from .plugin import Plugin
from .rewards import load_plugin
from .rewards import score_completions as score
from .types import Advantages, Critic, GroupFilter, PreferenceLogps, PreferenceLoss, Rollouts, Transformed

__version__ = "0.1.0"
__all__ = ["Advantages", "Critic", "GroupFilter", "Plugin", "PreferenceLogps", "PreferenceLoss", "Rollouts", "Transformed", "UserError",
           "hookimpl", "load_plugin", "score", "__version__"]
