"""posttrain: LLM post-training methods as plugins, composed by YAML recipes into TRL trainers.

The public API for plugin authors is small: subclass :class:`Plugin`, decorate hook methods
with :data:`hookimpl`, and register the class under the ``posttrain.plugins`` entry-point
group. The hooks are documented in :mod:`posttrain.hookspecs` and docs/hooks.md.
"""

from .errors import UserError
from .hookspecs import hookimpl
from .plugin import Plugin
from .types import PreferenceLogps, PreferenceLoss, Rollouts

__version__ = "0.1.0"
__all__ = ["Plugin", "PreferenceLogps", "PreferenceLoss", "Rollouts", "UserError", "hookimpl", "__version__"]
