"""GPT-2 with a LayerNorm on the embedding ("Embed LN", Takase et al. 2023, "Spike No More").

Shipped inside exported model directories and loaded with `trust_remote_code=True`:

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

It is Hugging Face's GPT2LMHeadModel with one change: the embedding output
LN(token embedding + position embedding) instead of the plain sum. GPT2Model applies its embedding
dropout `drop` to exactly that sum, so `drop` here is LayerNorm-then-dropout, and the LayerNorm's
weights are `transformer.drop.norm.{weight,bias}`; everything else (attention, caching,
generation) is GPT-2's own code. This file imports nothing but transformers and torch.
"""
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel


class GPT2EmbedLNConfig(GPT2Config):
    # A model type of its own, so that loading without trust_remote_code fails loudly instead of
    # building a plain GPT-2 that silently drops the embedding LayerNorm.
    model_type = "gpt2_embed_ln"


class EmbeddingLayerNorm(nn.Module):
    """LN, then the embedding dropout GPT-2 applies at this point."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.embd_pdrop)

    def forward(self, hidden_states):
        return self.dropout(self.norm(hidden_states))


class GPT2EmbedLNLMHeadModel(GPT2LMHeadModel):
    config_class = GPT2EmbedLNConfig

    def __init__(self, config: GPT2EmbedLNConfig):
        super().__init__(config)
        self.transformer.drop = EmbeddingLayerNorm(config)
        self.post_init()
