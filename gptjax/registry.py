"""The research models a config's `model` field may name: registered factories and package.module:factory imports.

Kept apart from gptjax.model so that config.validate can check a model name without importing the models.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sysconfig
import traceback
import typing

from gptjax.errors import UserError, first_line

if typing.TYPE_CHECKING:
    from flax import nnx

    from gptjax.compute import Compute
    from gptjax.config import ModelConfig

MODELS: dict[str, typing.Callable] = {}  # name -> factory(config, rngs), filled by register
BUILTIN_MODELS = ("gpt", "bigram")  # built by gptjax.model itself


def register(name: str, factory: typing.Callable | None = None):
    """Make `factory(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module` buildable as `--model=name`.

    The module maps tokens [B, T] (int32) to logits [B, T, V] (any float dtype; the loss takes float32) through
    `__call__(idx_BT, key=None)`: key is a PRNG key while training (for dropout; split it as you need) and None when
    evaluating or sampling. Its parameters are nnx.Param variables, drawn from `rngs.params()`. Use as a decorator
    (`@register("mine")`) or a call (`register("mine", factory)`); registering a name again replaces it.

    A run of a registered model resumes, samples and evaluates in any process that registered the name first. A
    model named `package.module:factory` instead is imported where it is needed, so `gptjax sample` and `gptjax
    eval` rebuild it too.
    """
    if name in BUILTIN_MODELS or not name or not name.replace(".", "").replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"cannot register a model as {name!r}: use letters, digits, '.', '_' or '-', and not "
                         f"{' or '.join(BUILTIN_MODELS)}")

    def add(f):
        MODELS[name] = f
        return f

    return add if factory is None else add(factory)


def research_factory(name: str) -> typing.Callable:
    """The factory (config, rngs, compute) -> module for a research model's `--model=name`; a UserError if none.

    The factory is checked as far as it can be without calling it (it must take (config, rngs)); the factory
    returned turns whatever the user's code raises or returns instead of an nnx.Module into a UserError.
    """
    if name in MODELS:
        factory = MODELS[name]
    elif ":" in name:
        factory = _import_factory(name)
    else:
        known = ", ".join([*BUILTIN_MODELS, *MODELS])
        raise UserError(f"--model={name} is not a model here ({known}): register it first "
                        "(gptjax.model.register), or name its factory as package.module:factory")
    if not _takes_config_and_rngs(factory):
        raise UserError(f"--model={name} is not a model factory (config, rngs) -> nnx.Module: "
                        f"{_describe(factory)}; name one that is")
    return functools.partial(_build, name, factory)


def _import_factory(name: str) -> typing.Callable:
    """package.module:factory, imported; every way the import can fail is a UserError naming --model."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise UserError(f"--model={name}: {'no factory after' if module_name else 'no module before'} ':'; name the "
                        "factory as package.module:factory")
    if module_name.startswith("."):
        raise UserError(f"--model={name}: {module_name} is a relative module name; name the factory by its "
                        "absolute import path, package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--model={name}: cannot import {module_name} ({e}); put its package on PYTHONPATH") from None
    except SyntaxError as e:
        raise UserError(f"--model={name}: {e.filename} has a syntax error at line {e.lineno}: {e.msg}; fix it") \
            from None
    except (Exception, SystemExit) as e:  # the user's module: whatever it raises is theirs to fix, not a gptjax bug
        raise UserError(f"--model={name}: importing {module_name} raised {_where(e)}; fix it") from None
    try:
        factory = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise UserError(f"--model={name}: {module_name} has no {attr}; name a model factory in it") from None
    if not callable(factory):
        raise UserError(f"--model={name}: {attr} is not callable; name a model factory (config, rngs) -> module")
    return factory


def _takes_config_and_rngs(factory) -> bool:
    """False when the factory's signature cannot take (config, rngs), or it is a class other than an nnx.Module."""
    from flax import nnx

    if isinstance(factory, type) and not issubclass(factory, nnx.Module):
        return False
    try:  # an nnx.Module's own signature is its metaclass' (*args, **kwargs): its __init__ says what it takes
        if isinstance(factory, type):
            inspect.signature(factory.__init__).bind(None, None, None)
        else:
            inspect.signature(factory).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): the call will tell
        pass
    return True


def _describe(factory) -> str:
    from flax import nnx

    if isinstance(factory, type) and not issubclass(factory, nnx.Module):
        return f"{factory.__qualname__} is a class but not an nnx.Module"
    try:
        sig = str(inspect.signature(factory.__init__ if isinstance(factory, type) else factory))
        return f"it takes {sig if len(sig) <= 60 else sig[:56] + ' ...)'}"
    except (TypeError, ValueError):
        return "it cannot be called with (config, rngs)"


def _build(name: str, factory: typing.Callable, c: ModelConfig, rngs: nnx.Rngs, compute: Compute) -> nnx.Module:
    """factory(c, rngs), its failures and a result that is not an nnx.Module a UserError naming --model."""
    from flax import nnx

    try:
        module = factory(c, rngs)
    except UserError:
        raise
    except (Exception, SystemExit) as e:  # the user's code: whatever it raises is theirs to fix, not a gptjax bug
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            raise  # out of memory, which the caller names
        if isinstance(e, TypeError) and e.__traceback__.tb_next is None:  # the call itself failed: not a factory
            raise UserError(f"--model={name} is not a model factory (config, rngs) -> nnx.Module: "
                            f"{first_line(e)}; name one that is") from None
        raise UserError(f"--model={name}: the factory raised {_where(e)}; fix it") from None
    if not isinstance(module, nnx.Module):
        what = "None" if module is None else f"{first_line(repr(module))[:60]} ({type(module).__name__})"
        raise UserError(f"--model={name}: the factory returned {what}, not an nnx.Module; return the model from it")
    return module


def _library_dirs() -> tuple[str, ...]:
    import flax
    import jax
    import numpy

    dirs = [os.path.dirname(m.__file__) for m in (jax, flax, numpy)] + [os.path.dirname(os.path.abspath(__file__))]
    return tuple(os.path.join(d, "") for d in dirs)


def _where(e: BaseException) -> str:
    """'ValueError at FILE line N: message' for the deepest frame of the user's own code where e was raised
    (not gptjax's, JAX's, Flax's, NumPy's or Python's own library), else the deepest frame."""
    frames = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    paths = sysconfig.get_paths()
    stdlib = os.path.join(paths["stdlib"], "")
    site = tuple(os.path.join(paths[k], "") for k in ("purelib", "platlib"))
    libs = _library_dirs()

    def is_user(f):
        p = os.path.abspath(f.filename)
        in_python = p.startswith(stdlib) and not p.startswith(site)
        return not (f.filename.startswith("<") or p.startswith(libs) or in_python)

    user = [f for f in frames if is_user(f)] or frames
    at = f" at {user[-1].filename} line {user[-1].lineno}" if user else ""
    what = f"exit({e.code})" if isinstance(e, SystemExit) else first_line(e)
    return f"{type(e).__name__}{at}: {what}"
