"""Name -> factory registries behind every CLI name (`robustlab list ...`).

Names are a public contract: once registered, a name keeps its meaning.

Options are checked against the factory's signature *before* it runs, so a typo names the entry and its valid
options, while an error raised inside a factory (a bug, or a value check of its own) keeps its traceback. A
factory that takes `**kwargs` declares where they go with `forwards_options_to = (callable, ...)` (on the class
that defines the `__init__`, or on the function), and `fixed_options = (...)` for forwarded names it sets itself;
the registry then knows every option it accepts.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Iterator, TypeVar

from robustlab.errors import OptionError, UnknownNameError

T = TypeVar("T")




class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            self._docs[name] = doc or inspect.cleandoc(factory.__doc__ or "")
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._entries))}"
            ) from None

    def options(self, name: str, n_positional: int = 0) -> list[str]:
        """The option names `name` accepts by keyword (after `n_positional` positional arguments, e.g. the model)."""
        names = option_names(self.get(name))
        return [n for n in names[n_positional:]]

    def check_options(self, name: str, kwargs: dict[str, Any], n_positional: int = 0) -> list[str]:
        """Refuse an option `name` does not take (naming the entry and its valid options), before any work;
        returns the valid ones."""
        valid = self.options(name, n_positional)
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            raise OptionError(f"bad options for {self.kind} {name!r}: no option {', '.join(map(repr, unknown))}; "
                              f"valid options: {', '.join(valid) or '(none)'}")
        return valid

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Build `name`; an unknown name lists the valid ones, an unknown or missing option names the entry and
        its valid options. Errors raised inside the factory propagate unchanged."""
        factory = self.get(name)
        valid = self.check_options(name, kwargs, len(args))
        sig = inspect.signature(factory)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            try:
                sig.bind(*args, **kwargs)
            except TypeError as e:
                raise OptionError(f"bad options for {self.kind} {name!r}: {e}; valid options: "
                                  f"{', '.join(valid) or '(none)'}") from None
        return factory(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self, name: str, full: bool = True) -> str:
        """The entry's description: its whole docstring, or (full=False) the first line."""
        self.get(name)
        text = self._docs.get(name, "")
        return text if full else (text.splitlines() or [""])[0]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _declared(factory: Callable[..., Any], attr: str) -> Any:
    """An option declaration: on the class that defines the __init__ in use, or on the function."""
    if isinstance(factory, type):
        owner = next(c for c in factory.__mro__ if "__init__" in vars(c))
        return vars(owner).get(attr)
    return getattr(factory, attr, None)


def option_names(factory: Callable[..., Any]) -> list[str]:
    """Every argument name a factory accepts, in signature order, following declared **kwargs forwarding.

    A factory that takes **kwargs without declaring where they go is a bug in robustlab (its options could be
    accepted and ignored): it raises TypeError."""
    return [p.name for p in _option_parameters(factory)]


def option_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    """{option: its default} for every option of `factory` (as `option_names`) that has one."""
    return {p.name: p.default for p in _option_parameters(factory) if p.default is not p.empty}


def _option_parameters(factory: Callable[..., Any]) -> list[inspect.Parameter]:
    sig = inspect.signature(factory)
    params: list[inspect.Parameter] = []
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY):
            params.append(p)
        elif p.kind is p.VAR_KEYWORD:
            targets = _declared(factory, "forwards_options_to")
            if targets is None:
                raise TypeError(f"{getattr(factory, '__qualname__', factory)} takes **{p.name} but does not declare "
                                "forwards_options_to")
            fixed = set(_declared(factory, "fixed_options") or ())
            for t in targets:
                params += [q for q in _option_parameters(t)
                           if q.name not in fixed and all(q.name != have.name for have in params)]
    return params


ATTACKS: Registry[Any] = Registry("attack")
MODELS: Registry[Any] = Registry("model")
DATASETS: Registry[Any] = Registry("dataset")
METHODS: Registry[Any] = Registry("method")
TASKS: Registry[Any] = Registry("task")
