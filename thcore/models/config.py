"""The base of the model configs (models/gpt.py:GPTConfig, models/transformer.py:TransformerConfig): a model's
shape as one frozen attrs object that tasks, `th.py bench`, export, interop and `init_from` share. It round-trips
through JSON (to_dict / from_dict: model.json, exports) and reads as that dict too (`config["n_layer"]`,
`GPT(**config)`); it equals a dict that reads as it (from_dict: missing fields at their defaults)."""
import collections.abc

import attrs


class ModelConfig(collections.abc.Mapping):
    __slots__ = ()

    def __getitem__(self, name):
        if name not in attrs.fields_dict(type(self)):
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self):
        return iter(attrs.fields_dict(type(self)))

    def __len__(self):
        return len(attrs.fields(type(self)))

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        """The config of a JSON dict; a missing field takes its default (files written before it existed), an
        unknown one is a ValueError naming it."""
        unknown = sorted(set(values) - set(attrs.fields_dict(cls)))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                             f"fields: {', '.join(attrs.fields_dict(cls))}")
        return cls(**values)

    def __eq__(self, other):
        if isinstance(other, ModelConfig):
            return type(other) is type(self) and other.to_dict() == self.to_dict()
        if isinstance(other, collections.abc.Mapping):
            try:
                return type(self).from_dict(dict(other)) == self
            except (TypeError, ValueError):   # not this config's fields
                return False
        return NotImplemented

    def __hash__(self):
        return hash((type(self), tuple(self.to_dict().items())))

    def replace(self, **changes):
        return attrs.evolve(self, **changes)
