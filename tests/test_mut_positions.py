"""The Qwen adapters' position code (issue 17's mutation testing): prompt positions, the last token's
positions, `rope_deltas`, the video modality, pixel splitting, and Qwen3-VL's deepstack injections.

Expected values are hand-computed (M-RoPE positions of a text + image prompt, deltas, split sizes, the rows
each injection adds) or the unmodified model's own output (`get_rope_index` for left padding and video timing).
"""

from __future__ import annotations

import pytest
import torch

from vlcache_hf import VLCacheError
from vlcache_hf.encoder import ImageFeatures
from vlcache_hf.models import get_adapter
from vlcache_hf.plan import ImageSpan
from vlcache_hf.tools import toy


def _hand_positions(input_ids: torch.Tensor, image_token_id: int, rows: int, cols: int) -> torch.Tensor:
    """M-RoPE positions of a prompt with one image of rows × cols merged tokens, by hand: text counts up on all
    three axes; the image sits at t = s, h = s + row, w = s + col (s: its first token's index); text after it
    resumes at s + max(rows, cols)."""
    ids = input_ids[0].tolist()
    first = ids.index(image_token_id)
    count = rows * cols
    assert ids[first : first + count] == [image_token_id] * count
    columns = [[i, i, i] for i in range(first)]
    columns += [[first, first + k // cols, first + k % cols] for k in range(count)]
    resume = first + max(rows, cols)
    columns += [[resume + i] * 3 for i in range(len(ids) - first - count)]
    return torch.tensor(columns).T[:, None, :]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_prompt_positions_of_text_and_an_image_by_hand(models, images, family):
    model, processor = models(family)
    adapter = get_adapter(model)
    inputs = toy.chat_inputs(processor, [toy.message("user", "Look:", images[0], "Which colour?")])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]  # 8×8 patches, merged 2×2: 4×4 tokens
    expected = _hand_positions(inputs["input_ids"], model.config.image_token_id, 4, 4)
    got = adapter.prompt_positions(dict(inputs), inputs["input_ids"])
    assert torch.equal(got, expected)


def test_prompt_positions_without_images_or_token_types_count_up(models):
    model, _ = models("qwen2_5_vl")
    adapter = get_adapter(model)
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    expected = torch.arange(5).view(1, 1, 5).expand(3, 1, 5)
    for kwargs in ({}, {"image_grid_thw": torch.tensor([[1, 8, 8]])}, {"mm_token_type_ids": torch.zeros(1, 5, dtype=torch.long)}):
        got = adapter.prompt_positions(kwargs, input_ids)
        assert got.shape == (3, 1, 5) and torch.equal(got, expected)


def test_prompt_positions_given_by_generate(models):
    model, _ = models("qwen2_5_vl")
    adapter = get_adapter(model)
    input_ids = torch.zeros(1, 4, dtype=torch.long)
    four = torch.tensor([[[0, 1, 2, 3]], [[10, 11, 12, 13]], [[20, 21, 22, 23]], [[30, 31, 32, 33]]])
    assert torch.equal(adapter.prompt_positions({"position_ids": four}, input_ids), four[1:])  # text row dropped
    three = four[1:]
    assert torch.equal(adapter.prompt_positions({"position_ids": three}, input_ids), three)
    flat = torch.tensor([[4, 5, 6, 7]])
    got = adapter.prompt_positions({"position_ids": flat}, input_ids)
    assert got.shape == (3, 1, 4) and all(torch.equal(got[axis], flat) for axis in range(3))


def test_prompt_positions_follow_the_models_own_rope_index_with_padding_and_video_timing(models, images):
    """Left padding (attention mask) and a video's seconds per grid step change the positions: the expected
    values are the unmodified model's own `get_rope_index` with the same inputs."""
    model, processor = models("qwen2_5_vl")
    adapter = get_adapter(model)
    clip = toy.make_video(1)
    inputs = dict(toy.chat_inputs(processor, [toy.message("user", images[0], clip, "What happens?")]))
    assert inputs.get("second_per_grid_ts") is not None
    pad = 3
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([torch.zeros(1, pad, dtype=torch.long), inputs["input_ids"]], dim=1)
    padded["attention_mask"] = torch.cat([torch.zeros(1, pad, dtype=torch.long), inputs["attention_mask"]], dim=1)
    padded["mm_token_type_ids"] = torch.cat([torch.zeros(1, pad, dtype=torch.long), inputs["mm_token_type_ids"]], dim=1)
    slow = dict(padded)
    slow["second_per_grid_ts"] = [t * 3 for t in inputs["second_per_grid_ts"]] if isinstance(
        inputs["second_per_grid_ts"], list) else inputs["second_per_grid_ts"] * 3
    for kwargs in (padded, slow):
        expected, _ = model.model.get_rope_index(
            kwargs["input_ids"],
            mm_token_type_ids=kwargs["mm_token_type_ids"],
            image_grid_thw=kwargs["image_grid_thw"],
            video_grid_thw=kwargs["video_grid_thw"],
            attention_mask=kwargs["attention_mask"],
            second_per_grid_ts=kwargs["second_per_grid_ts"],
        )
        assert torch.equal(adapter.prompt_positions(kwargs, kwargs["input_ids"]), expected)
    without_mask = model.model.get_rope_index(
        padded["input_ids"], mm_token_type_ids=padded["mm_token_type_ids"], image_grid_thw=padded["image_grid_thw"],
        video_grid_thw=padded["video_grid_thw"], second_per_grid_ts=padded["second_per_grid_ts"],
    )[0]
    plain_timing = adapter.prompt_positions(padded, padded["input_ids"])
    assert not torch.equal(without_mask, plain_timing)  # the mask matters here
    assert not torch.equal(adapter.prompt_positions(slow, slow["input_ids"]), plain_timing)  # and so does the timing
    video_only = dict(toy.chat_inputs(processor, [toy.message("user", clip, "What happens?")]))
    assert video_only.get("image_grid_thw") is None
    expected, _ = model.model.get_rope_index(
        video_only["input_ids"], mm_token_type_ids=video_only["mm_token_type_ids"], video_grid_thw=video_only["video_grid_thw"],
        attention_mask=video_only["attention_mask"], second_per_grid_ts=video_only["second_per_grid_ts"],
    )
    got = adapter.prompt_positions(video_only, video_only["input_ids"])  # a video alone: its grid is enough
    assert torch.equal(got, expected) and got.max() < video_only["input_ids"].shape[1] - 1


def test_last_token_positions_and_rope_deltas_by_hand(models):
    model, _ = models("qwen2_5_vl")
    adapter = get_adapter(model)
    positions = torch.tensor([[[0, 1, 2, 2, 3]], [[0, 1, 2, 3, 4]], [[0, 1, 2, 4, 5]]])
    assert torch.equal(adapter.last_token_position_ids({}, positions), torch.tensor([[[3]], [[4]], [[5]]]))
    assert torch.equal(adapter.last_token_position_ids({}, positions, count=2), positions[..., 3:])
    given = positions + 100
    got = adapter.last_token_position_ids({"position_ids": given}, positions, count=3)
    assert torch.equal(got, given[..., 2:]) and got.is_contiguous()
    adapter.after_prefill(positions, 5)  # max 5, 5 tokens: the next token is at 6 = 5 + 1
    deltas = model.model.rope_deltas
    assert deltas.dtype == torch.long and deltas.shape == (1, 1) and deltas.item() == 1
    adapter.after_prefill(torch.tensor([[[0, 1, 2]]] * 3), 7)
    assert model.model.rope_deltas.item() == -4 and model.model.rope_deltas.dtype == torch.long
    adapter.after_prefill(torch.tensor([[[0, 1, 5]]] * 3, dtype=torch.int32), 3)  # int32 positions: still long
    assert model.model.rope_deltas.item() == 3 and model.model.rope_deltas.dtype == torch.long
    model.model.rope_deltas = None


def test_video_modality_and_layouts(models):
    model, _ = models("qwen2_5_vl")
    adapter = get_adapter(model)
    image, video = adapter.modalities()
    assert (image.name, image.token_id, image.encoder_method, image.pixels_arg, image.layout_arg) == (
        "image", model.config.image_token_id, "get_image_features", "pixel_values", "image_grid_thw"
    )
    assert (video.name, video.token_id, video.encoder_method, video.pixels_arg, video.layout_arg) == (
        "video", model.config.video_token_id, "get_video_features", "pixel_values_videos", "video_grid_thw"
    )
    assert isinstance(video.token_id, int) and video.extra_layout_args == ()
    assert adapter.prefill_only_inputs() == {
        "mm_encoder_outputs", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"
    }
    layout = torch.tensor([[1, 2, 3], [2, 1, 2]])
    pixels = torch.arange(10 * 4).view(10, 4)
    parts = adapter.split_pixels(pixels, layout)
    assert [p.shape[0] for p in parts] == [6, 4] and torch.equal(parts[1], pixels[6:])
    assert adapter.image_layouts(parts, layout) == [(1, 2, 3), (2, 1, 2)]
    assert all(type(x) is int for grid in adapter.image_layouts(parts, layout) for x in grid)
    with pytest.raises(VLCacheError) as raised:
        adapter.split_pixels(pixels, None)
    assert str(raised.value) == "pixel_values were given without image_grid_thw; pass the processor's full output"
    assert adapter.image_feature_owner() is model.model and adapter.vision_tower is model.model.visual


def test_qwen3_vl_never_windows_and_injects_deepstack_rows_by_hand(models):
    model, _ = models("qwen3_vl")
    adapter = get_adapter(model)
    assert [adapter.attention_window(i) for i in range(len(model.model.language_model.layers))] == [None] * len(
        model.model.language_model.layers
    )
    hidden = 2
    # item 0: 3 rows per layer (values 100·layer + 10·row + 1); item 1: 4 rows (100·layer + 10·row + 2)
    rows0 = [torch.tensor([[100.0 * layer + 10 * r + 1] * hidden for r in range(3)]) for layer in range(2)]
    rows1 = [torch.tensor([[100.0 * layer + 10 * r + 2] * hidden for r in range(4)]) for layer in range(2)]
    features = ImageFeatures([torch.zeros(3, hidden), torch.zeros(4, hidden)], ["a", "b"], [False, False],
                             deepstack=[tuple(rows0), tuple(rows1)])
    embeddings = torch.zeros(1, 8, hidden)
    # item 0 at tokens 1..3 (all its rows); item 1's rows 2..3 at tokens 6..7 and its row 1 cut by the end (8)
    spans = [ImageSpan(0, 1, 4, "a"), ImageSpan(1, 6, 9, "b:1", offset=1)]
    got = adapter.layer_injections(spans, features, embeddings)
    assert sorted(got) == [0, 1]
    for layer in (0, 1):
        expected = torch.zeros(1, 8, hidden)
        expected[0, 1:4] = torch.tensor([[100.0 * layer + 10 * r + 1] * hidden for r in range(3)])
        expected[0, 6:8] = torch.tensor([[100.0 * layer + 10 * r + 2] * hidden for r in (1, 2)])
        assert torch.equal(got[layer], expected), layer
    assert adapter.layer_injections([], features, embeddings) == {}
    assert adapter.layer_injections(spans, ImageFeatures(features.embeddings, ["a", "b"], [False] * 2), embeddings) == {}
    past_the_end = [ImageSpan(0, 8, 11, "a")]  # a span wholly past the tokens adds nothing
    assert all(torch.equal(t, torch.zeros(1, 8, hidden)) for t in adapter.layer_injections(past_the_end, features, embeddings).values())
