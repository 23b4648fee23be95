"""Model construction: a config and a tokenizer -> (graphdef, params), and back to a model.

`create_model` builds the TwoTower of `config.model` and splits it into its graph
definition and a nested dict of float32 parameters; `merge_model` rebuilds the
module from the two, inside or outside jit. Every caller that needs a model
(training, evaluation, conversion, serving) goes through these two functions.
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from prodclip.models import two_tower


def create_model(config: ml_collections.ConfigDict, tokenizer, seed: int):
    """(graphdef, params): params a nested dict of float32 arrays, initialised from `seed`.

    tokenizer: anything with `vocab_size` and `pad_id` (a TitleTokenizer).
    """
    model = two_tower.build_model(config, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                  rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params.to_pure_dict()


def merge_model(graphdef, params) -> two_tower.TwoTower:
    """The TwoTower of `graphdef` holding `params` (a nested dict or an nnx.State)."""
    state = nnx.State(params) if not isinstance(params, nnx.State) else params
    return nnx.merge(graphdef, state)
