"""The pulling loss's options: one frozen object, built from the run config and checked once."""

from __future__ import annotations

import dataclasses

import ml_collections

LOSSES = ("infonce", "mse")
KEY_DOMAINS = ("source", "target")


@dataclasses.dataclass(frozen=True)
class PullOptions:
    """What `config.pull` (and `config.model.num_classes`) tell the loss; hashable, so a static
    argument of a jitted function."""

    num_classes: int  # K
    num_queries: int  # N, base number of queries per batch
    class_balanced_queries: bool  # CBQS; False = N per class
    num_negatives: int  # M per query
    domain_equalised_negatives: bool  # DENPS: M/2 from each domain
    unreliable_fraction: float  # alpha of the target confidence quantile
    dynamic_reweighting: bool  # DRW
    reweight_scale: float  # s in (1 - conf_c)^s
    loss: str  # 'infonce' | 'mse'
    temperature: float  # tau of InfoNCE
    key_domain: str = "source"  # positive prototypes: 'source' | 'target'
    num_groups: int | None = None  # sampling groups; None = one per device of the mesh

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> PullOptions:
        """The options of a run config, checked against its data (`config.data.target`)."""
        pull = config.pull
        from_pull = {field.name: pull[field.name] for field in dataclasses.fields(cls) if field.name in pull}
        options = cls(**{**from_pull, "num_classes": config.model.num_classes, "num_groups": pull.num_groups or None})
        options.check(has_target=bool(config.data.target))
        return options

    def check(self, *, has_target: bool) -> None:
        """A ValueError naming the pull.* option that is unknown or needs target data it does not have."""
        if self.loss not in LOSSES:
            raise ValueError(f"unknown pull.loss {self.loss!r}; expected one of {LOSSES}")
        if self.key_domain not in KEY_DOMAINS:
            raise ValueError(f"unknown pull.key_domain {self.key_domain!r}; expected one of {KEY_DOMAINS}")
        if not has_target:
            for name, on in (
                ("pull.domain_equalised_negatives", self.domain_equalised_negatives),
                ("pull.dynamic_reweighting", self.dynamic_reweighting),
                ("pull.key_domain='target'", self.key_domain == "target"),
            ):
                if on:
                    raise ValueError(f"{name} needs target data; switch it off for domain generalisation")

