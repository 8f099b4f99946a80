"""The torch modules of the catalogue; :mod:`aimass.core.nn.build` makes them from specs.

Every network takes its inputs as flat tensors, one row per example, exactly
as they come out of a dataset (``[batch, features]`` floats, ``[batch, tokens]``
int64 ids, ``[batch]`` int64 user and item ids) and returns
``[batch, num_outputs]``, so the same code feeds training, ONNX export and
serving. Reshaping into channels, images or sequences happens inside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


def mlp_layers(
    in_features: int,
    hidden_sizes: Sequence[int],
    out_features: int | None,
    activation: str = "relu",
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Linear (+ batch norm) + activation (+ dropout) per hidden size, then a linear head."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden_sizes:
        layers.append(nn.Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    if out_features is not None:
        layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class Mlp(nn.Module):
    """A multi-layer perceptron over ``[batch, in_features]``."""

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        num_outputs: int,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.layers = mlp_layers(
            in_features, hidden_sizes, num_outputs, activation, dropout, batch_norm
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _conv_block(
    conv: nn.Module, channels: int, norm: type[nn.Module] | None, activation: str
) -> list[nn.Module]:
    block: list[nn.Module] = [conv]
    if norm is not None:
        block.append(norm(channels))
    block.append(ACTIVATIONS[activation]())
    return block


class Cnn1d(nn.Module):
    """Conv1d blocks over ``[batch, in_channels * length]`` read as channels x length.

    Global average pooling over the length feeds an MLP head.
    """

    def __init__(
        self,
        in_channels: int,
        length: int,
        channels: Sequence[int],
        num_outputs: int,
        kernel_size: int = 3,
        pool_size: int = 0,
        hidden_sizes: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.length = in_channels, length
        layers: list[nn.Module] = []
        width = in_channels
        for out in channels:
            conv = nn.Conv1d(width, out, kernel_size, padding=kernel_size // 2)
            layers += _conv_block(conv, out, nn.BatchNorm1d if batch_norm else None, activation)
            if pool_size > 1:
                layers.append(nn.MaxPool1d(pool_size, ceil_mode=True))
            width = out
        self.features = nn.Sequential(*layers)
        self.head = mlp_layers(width, hidden_sizes, num_outputs, activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.in_channels, self.length)
        return self.head(self.features(x).mean(dim=-1))


class Cnn2d(nn.Module):
    """Conv2d blocks over ``[batch, C * H * W]`` read as images, flattened into an MLP head."""

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        channels: Sequence[int],
        num_outputs: int,
        kernel_size: int = 3,
        pool_size: int = 0,
        hidden_sizes: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.shape = (in_channels, height, width)
        layers: list[nn.Module] = []
        depth = in_channels
        for out in channels:
            conv = nn.Conv2d(depth, out, kernel_size, padding=kernel_size // 2)
            layers += _conv_block(conv, out, nn.BatchNorm2d if batch_norm else None, activation)
            depth = out
        if pool_size > 1:
            # One pooling after the conv stack (conv32-conv64-pool-fc128 and the like).
            layers.append(nn.MaxPool2d(pool_size, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *self.shape)).numel()
        self.head = mlp_layers(flat, hidden_sizes, num_outputs, activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, *self.shape)
        return self.head(torch.flatten(self.features(x), 1))


class RnnClassifier(nn.Module):
    """An LSTM or GRU over token ids (with an embedding) or over steps of feature vectors.

    The last layer's final hidden state (both directions when bidirectional)
    feeds a linear head.
    """

    def __init__(
        self,
        cell: str,
        hidden_size: int,
        num_outputs: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        vocab_size: int = 0,
        embedding_dim: int = 0,
        step_features: int = 1,
    ) -> None:
        super().__init__()
        self.step_features = step_features
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if vocab_size else None
        rnn_class = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_class(
            input_size=embedding_dim if vocab_size else step_features,
            hidden_size=hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            steps = self.embedding(x)
        else:
            steps = x.reshape(x.shape[0], -1, self.step_features)
        output, _ = self.rnn(steps)
        hidden = self.rnn.hidden_size
        if self.rnn.bidirectional:
            # Forward direction ends at the last step, the backward one at the first.
            last = torch.cat([output[:, -1, :hidden], output[:, 0, hidden:]], dim=-1)
        else:
            last = output[:, -1, :]
        return self.head(last)


class HeadAttention(nn.Module):
    """Self-attention over ``num_heads`` heads of ``head_dim`` each, any inner width.

    torch's MultiheadAttention splits d_model into its heads, so a layer cannot hold fewer
    heads at the same d_model; here q/k/v project d_model -> num_heads * head_dim and the
    output projection maps that back to d_model, so structured pruning removes heads for
    real. Parameter names and layout are MultiheadAttention's (``in_proj_weight`` holds
    q, k, v stacked, ``out_proj``), so its state dicts slice into this one.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner))
        self.out_proj = nn.Linear(inner, d_model)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """``x`` [batch, length, d_model]; ``key_padding_mask`` [batch, length], 0 or -inf."""
        batch, length, _ = x.shape
        q, k, v = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        scores = heads(q) @ heads(k).transpose(-2, -1) / math.sqrt(self.head_dim)
        scores = scores + key_padding_mask[:, None, None, :]
        weights = self.dropout(torch.softmax(scores, dim=-1))
        context = (weights @ heads(v)).transpose(1, 2).reshape(batch, length, -1)
        return self.out_proj(context)


class HeadEncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer's computation (post-norm, ReLU) over :class:`HeadAttention`,
    with its parameter names: the layer of a network whose heads were pruned."""

    def __init__(
        self, d_model: int, num_heads: int, head_dim: int, feedforward_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.self_attn = HeadAttention(d_model, num_heads, head_dim, dropout)
        self.linear1 = nn.Linear(d_model, feedforward_dim)
        self.linear2 = nn.Linear(feedforward_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x, key_padding_mask)))
        feedforward = self.linear2(self.dropout(torch.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(feedforward))


class HeadEncoder(nn.Module):
    """Stacked :class:`HeadEncoderLayer` (``layers``, as in nn.TransformerEncoder)."""

    def __init__(self, layers: Sequence[HeadEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, src_key_padding_mask)
        return x


class TransformerClassifier(nn.Module):
    """Token and learned position embeddings, a transformer encoder, pooling, a linear head.

    Padding tokens (``padding_id``) are masked out of attention and of mean
    pooling. Sequences longer than ``max_sequence_length`` are truncated.
    """

    def __init__(
        self,
        vocab_size: int,
        max_sequence_length: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        num_outputs: int,
        *,
        feedforward_dim: int = 0,
        dropout: float = 0.0,
        pooling: str = "mean",
        padding_id: int = 0,
        head_dim: int = 0,
    ) -> None:
        super().__init__()
        self.max_sequence_length = max_sequence_length
        self.padding_id = padding_id
        self.pooling = pooling
        self.tokens = nn.Embedding(vocab_size, d_model)
        extra = 1 if pooling == "cls" else 0
        self.positions = nn.Parameter(torch.zeros(1, max_sequence_length + extra, d_model))
        nn.init.normal_(self.positions, std=0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if pooling == "cls" else None
        feedforward = feedforward_dim or 4 * d_model
        self.encoder: nn.Module
        if head_dim:  # heads of their own width (pruned heads): same parameter names
            self.encoder = HeadEncoder(
                [HeadEncoderLayer(d_model, num_heads, head_dim, feedforward, dropout)
                 for _ in range(num_layers)]
            )  # fmt: skip
        else:
            layer = nn.TransformerEncoderLayer(
                d_model, num_heads, feedforward, dropout=dropout, batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x[:, : self.max_sequence_length].long()
        padding = tokens == self.padding_id
        states = self.tokens(tokens)
        if self.cls is not None:
            states = torch.cat([self.cls.expand(states.shape[0], -1, -1), states], dim=1)
            padding = torch.cat([torch.zeros_like(padding[:, :1]), padding], dim=1)
        states = states + self.positions[:, : states.shape[1]]
        # A float mask (0 or -inf) exports to ONNX the same way it runs in torch.
        mask = torch.zeros(padding.shape, dtype=states.dtype, device=states.device)
        mask = mask.masked_fill(padding, float("-inf"))
        # A row of padding only would attend to nothing: let it attend to everything.
        mask = torch.where(padding.all(dim=1, keepdim=True), torch.zeros_like(mask), mask)
        states = self.norm(self.encoder(states, src_key_padding_mask=mask))
        if self.cls is not None:
            pooled = states[:, 0]
        else:
            keep = (~padding).to(states.dtype).unsqueeze(-1)
            pooled = (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


class TwoTower(nn.Module):
    """User and item towers (id embedding + MLP); the score is their dot product, ``[batch, 1]``."""

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_dim: int,
        tower_sizes: Sequence[int] = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.users = nn.Embedding(num_users, embedding_dim)
        self.items = nn.Embedding(num_items, embedding_dim)
        hidden, last = list(tower_sizes[:-1]), (tower_sizes[-1] if tower_sizes else None)
        self.user_tower = mlp_layers(embedding_dim, hidden, last, dropout=dropout)
        self.item_tower = mlp_layers(embedding_dim, hidden, last, dropout=dropout)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        u = self.user_tower(self.users(user.reshape(-1).long()))
        v = self.item_tower(self.items(item.reshape(-1).long()))
        return (u * v).sum(dim=-1, keepdim=True)


class MatrixFactorization(nn.Module):
    """score = <user factors, item factors> (+ global, user and item biases), ``[batch, 1]``."""

    def __init__(
        self, num_users: int, num_items: int, num_factors: int, use_bias: bool = False
    ) -> None:
        super().__init__()
        self.users = nn.Embedding(num_users, num_factors)
        self.items = nn.Embedding(num_items, num_factors)
        nn.init.normal_(self.users.weight, std=0.05)
        nn.init.normal_(self.items.weight, std=0.05)
        self.use_bias = use_bias
        if use_bias:
            self.user_bias = nn.Embedding(num_users, 1)
            self.item_bias = nn.Embedding(num_items, 1)
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.item_bias.weight)
            self.global_bias = nn.Parameter(torch.zeros(1))

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        user, item = user.reshape(-1).long(), item.reshape(-1).long()
        score = (self.users(user) * self.items(item)).sum(dim=-1, keepdim=True)
        if self.use_bias:
            score = score + self.user_bias(user) + self.item_bias(item) + self.global_bias
        return score
