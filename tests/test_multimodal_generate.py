"""Images and videos through the generator and the chat: prompts, cached preprocessing and features, prompt-cache
reuse, errors."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from tokenizer_fixture import qwen36_processor_dir_or_skip

import mlx_qwen36.generator as gen
import mlx_qwen36.multimodal as mm
from mlx_qwen36 import generate, load, make_prompt_cache, synthetic
from mlx_qwen36.chat import Session
from mlx_qwen36.image_processor import ImageProcessor
from mlx_qwen36.video import VideoProcessor

SMALL = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3}


@pytest.fixture(scope="module")
def vl_dir(shared_dir, tmp_path_factory) -> Path:
    """A tiny random vision-language model with the real vocabulary, tokenizer and template, small pixel budgets."""
    out = tmp_path_factory.mktemp("vl") / "tiny-vl"
    synthetic.write_checkpoint(out, synthetic.text_config("tiny", vocab_size=248320), dtype=mx.float32,
                               vision=synthetic.vision_config("tiny", 64))
    for f in qwen36_processor_dir_or_skip(shared_dir).iterdir():
        shutil.copy(f, out / f.name)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, **SMALL}))
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 64 * 64, "longest_edge": 4 * 128 * 128}, **SMALL}))
    return out


@pytest.fixture(scope="module")
def vl(vl_dir):
    return load(vl_dir)


def image(seed: int, size=(150, 100)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def frames(seed: int, n: int = 6) -> dict:
    return {"frames": [image(seed + i, (64, 64)) for i in range(n)], "fps": 2}


def user(text: str, *media: dict) -> dict:
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


def image_part(im) -> dict:
    return {"type": "image_url", "image_url": {"url": im}}


def first_logits(model, processor, messages, pc) -> tuple[np.ndarray, int]:
    ids, text = gen.build_prompt(processor, messages, None, True, False)
    media = mm.media_prompt(model, processor, text, *mm.collect_media(messages))
    cached = pc.reuse(model, media.keys)
    return np.array(gen.prefill(model, pc, media.ids, cached, 5, media)), cached


def test_decoding_after_an_image_uses_the_compiled_step(vl, monkeypatch):
    """Text after an image decodes through the compiled step at cache index + rope_delta, token for token as
    the plain model call with explicit 3-D positions does."""
    model, processor = vl
    kwargs = {"images": [image(0)], "max_tokens": 6, "temperature": 0}
    real = gen.decode_step(model)
    calls = []
    monkeypatch.setattr(gen, "decode_step", lambda m: lambda *a: calls.append(a[2]) or real(*a))
    fast = generate(model, processor, "Describe it", **kwargs).tokens
    assert len(calls) == 6 and all(delta != 0 for delta in calls)  # every decoded token, with the image's delta
    monkeypatch.setattr(gen, "decode_step", lambda m: None)
    assert generate(model, processor, "Describe it", **kwargs).tokens == fast


def test_images_and_video_in_one_prompt(vl):
    model, processor = vl
    r = generate(model, processor, "Compare them", images=[image(0), image(1, (64, 200))],
                 videos=[frames(10)], max_tokens=4, temperature=0)
    assert r.finish_reason == "length" and len(r.tokens) == 4
    text = processor.decode(mm.media_prompt(model, processor, processor.apply_chat_template(
        [user("x", image_part(image(0)), {"type": "video", "video": frames(10)})], tokenize=False),
        [image(0)], [frames(10)]).ids)
    assert text.count(" seconds>") == 3 and "<2.2 seconds>" in text  # 6 frames at 2 fps: 3 pairs
    assert text.count("<|vision_start|>") == 1 + 3


def test_later_turns_reuse_the_image_state_and_its_features(vl, monkeypatch):
    model, processor = vl
    calls = []
    real = model.visual.__call__
    monkeypatch.setattr(type(model.visual), "__call__", lambda self, *a: calls.append(1) or real(*a))
    pc = make_prompt_cache(model)
    messages = [user("What is this?", image_part(image(3)))]
    first = generate(model, processor, messages, max_tokens=3, temperature=0, prompt_cache=pc)
    messages += [{"role": "assistant", "content": first.content}, user("And now?")]
    reused, cached = first_logits(model, processor, messages, pc)
    fresh, none = first_logits(model, processor, messages, make_prompt_cache(model))
    ids, text = gen.build_prompt(processor, messages, None, True, False)
    ids = mm.media_prompt(model, processor, text, *mm.collect_media(messages)).ids
    assistant_turn = [i for i, t in enumerate(ids) if t == processor.token_id("<|im_start|>")][1]
    assert none == 0 and cached == assistant_turn  # the whole first user turn, image included
    assert np.abs(reused - fresh).max() <= 1e-5
    assert len(calls) == 2  # once for the conversation, once for the fresh cache; never again for reuse


def test_another_image_is_not_served_from_the_cache(vl):
    model, processor = vl
    pc = make_prompt_cache(model)
    generate(model, processor, [user("Look", image_part(image(4)))], max_tokens=2, temperature=0, prompt_cache=pc)
    messages = [user("Look", image_part(image(5)))]
    reused, cached = first_logits(model, processor, messages, pc)
    fresh, _ = first_logits(model, processor, messages, make_prompt_cache(model))
    start = processor.encode("<|im_start|>user\n<|vision_start|>")
    assert cached <= len(start)
    assert np.abs(reused - fresh).max() <= 1e-5


def test_chunked_prefill_with_images_equals_one_chunk(vl):
    model, processor = vl
    messages = [user("Describe", image_part(image(6)))]
    ids, text = gen.build_prompt(processor, messages, None, True, False)
    media = mm.media_prompt(model, processor, text, *mm.collect_media(messages))
    small = gen.prefill(model, make_prompt_cache(model), media.ids, 0, 3, media)
    whole = model(mx.array([media.ids]), position_ids=media.position_ids,
                  input_embeddings=mm.embed(model, media, 0, mm.FeatureCache()))[:, -1]
    assert np.abs(np.array(small) - np.array(whole)).max() <= 1e-5


def test_text_only_model_refuses_media(vl_dir):
    model, processor = load(vl_dir, text_only=True)
    assert "visual" not in model
    with pytest.raises(ValueError, match="without its vision tower"):
        generate(model, processor, "hi", images=[image(0)], max_tokens=2)


def test_unreadable_image_is_a_clear_error(vl, tmp_path):
    model, processor = vl
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png"):
        generate(model, processor, "hi", images=[str(bad)], max_tokens=2)


def write_video(path: Path, n: int = 8, fps: int = 4) -> Path:
    av = pytest.importorskip("av", reason="PyAV is not installed")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_image(image(20 + i, (64, 64)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_chat_with_an_image_and_a_video(vl, tmp_path):
    model, processor = vl
    path = tmp_path / "cat.png"
    image(7).save(path)
    clip = write_video(tmp_path / "clip.mp4")
    session = Session(model, processor, {"temperature": 0}, max_tokens=3, out=io.StringIO())
    session.command(f"/image {path}")
    session.command(f"/image {tmp_path / 'missing.png'}")
    session.ask("What is it?")
    assert session.messages[0]["content"][0] == {"type": "image_url", "image_url": {"url": str(path)}}
    assert session.attachments == []
    assert "no such file" in session.out.getvalue() and session.last.finish_reason == "length"
    session.command(f"/video {clip}")
    session.ask("And this clip?")
    assert session.messages[2]["content"][0] == {"type": "video_url", "video_url": {"url": str(clip)}}
    assert session.last.finish_reason == "length" and session.last.cached_tokens > 0


def data_url(im: Image.Image) -> str:
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def processed(monkeypatch) -> dict[str, list]:
    """The sources each processor is called on, call by call."""
    seen: dict[str, list] = {"image": [], "video": []}
    for kind, cls in (("image", ImageProcessor), ("video", VideoProcessor)):
        def spy(self, sources, *args, _kind=kind, _real=cls.__call__, **kwargs):
            seen[_kind].append(list(sources))
            return _real(self, sources, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)
    return seen


def test_later_turns_do_not_preprocess_their_media_again(vl, tmp_path, processed):
    model, processor = vl
    photo, clip = tmp_path / "photo.png", write_video(tmp_path / "clip.mp4")
    image(30).save(photo)
    media = [image_part(str(photo)), image_part(data_url(image(31))), image_part(image(32)),
             {"type": "video_url", "video_url": {"url": str(clip)}}, {"type": "video", "video": frames(40, 4)}]
    pc = make_prompt_cache(model)
    messages = [user("Compare", *media)]
    first = generate(model, processor, messages, max_tokens=2, temperature=0, prompt_cache=pc)
    assert [len(c) for c in processed["image"]] == [1, 1, 1] and [len(c) for c in processed["video"]] == [1, 1]
    messages += [{"role": "assistant", "content": first.content}, user("And the clip?")]
    second = generate(model, processor, messages, max_tokens=2, temperature=0, prompt_cache=pc)
    assert len(processed["image"]) == 3 and len(processed["video"]) == 2  # nothing processed again
    assert second.cached_tokens > 0

    _, text = gen.build_prompt(processor, messages, None, True, False)
    found = mm.collect_media(messages)
    cached, fresh = mm.media_prompt(model, processor, text, *found, pc.media), mm.media_prompt(
        model, processor, text, *found)
    assert cached.ids == fresh.ids and cached.keys == fresh.keys
    assert all(np.array_equal(a.pixels, b.pixels) and np.array_equal(a.grid, b.grid)
               for a, b in zip(cached.items, fresh.items, strict=True))

    calls, video_calls = len(processed["image"]), len(processed["video"])
    stat = photo.stat()
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: it may have changed
    mm.media_prompt(model, processor, text, *found, pc.media)
    assert processed["image"][calls:] == [[str(photo)]] and len(processed["video"]) == video_calls
    image(33).save(photo)  # changed: processed again, with the new pixels
    changed = mm.media_prompt(model, processor, text, *found, pc.media)
    assert processed["image"][calls + 1:] == [[str(photo)]]
    assert not np.array_equal(changed.items[0].pixels, cached.items[0].pixels)


def test_media_processed_one_at_a_time_equals_the_batch(vl):
    _, processor = vl
    images = [image(50), image(51, (64, 200)), image(52, (300, 90))]
    batch = processor.image_processor(images)
    singles = [processor.image_processor([im]) for im in images]
    assert np.array_equal(batch["pixel_values"], np.concatenate([s["pixel_values"] for s in singles]))
    assert np.array_equal(batch["image_grid_thw"], np.concatenate([s["image_grid_thw"] for s in singles]))
    videos = [frames(60, 6), frames(70, 3)]
    batch = processor.video_processor(videos)
    singles = [processor.video_processor([v]) for v in videos]
    assert np.array_equal(batch["pixel_values_videos"], np.concatenate([s["pixel_values_videos"] for s in singles]))
    assert np.array_equal(batch["video_grid_thw"], np.concatenate([s["video_grid_thw"] for s in singles]))
    assert batch["video_timestamps"] == [s["video_timestamps"][0] for s in singles]


def test_media_keys_follow_the_content_and_the_settings(vl, tmp_path):
    _, processor = vl
    settings = processor.image_processor
    im = image(80)
    key = mm.media_key("image", im, settings)
    assert key == mm.media_key("image", image(80), settings)  # the same pixels in another object
    assert key != mm.media_key("image", im, dataclasses.replace(settings, max_pixels=64 * 64))
    assert key != mm.media_key("video", im, processor.video_processor)
    im.putpixel((0, 0), (1, 2, 3))
    assert key != mm.media_key("image", im, settings)
    url = data_url(image(81))
    assert mm.media_key("image", url, settings) == mm.media_key("image", str(url), settings)
    assert mm.media_key("image", str(tmp_path / "missing.png"), settings) is None  # the processor names the error
    assert mm.media_key("image", "https://example.com/a.png", settings) is None
    clip = frames(90, 4)
    assert mm.media_key("video", clip, processor.video_processor) != mm.media_key(
        "video", {**clip, "fps": 4}, processor.video_processor)


def test_the_media_cache_is_bounded_in_items_and_bytes():
    def item(n: int) -> mm.MediaItem:
        return mm.MediaItem("image", np.zeros((n, 4), np.float32), np.array([1, 2, 2]), str(n))

    cache = mm.MediaCache(capacity=3, max_bytes=1000)
    for key in "abc":
        cache.put(key, item(10))  # 160 bytes each
    cache.get("a")
    cache.put("d", item(10))
    assert list(cache.items) == ["c", "a", "d"]  # least recently used first out
    cache.put("e", item(50))  # 800 bytes: two more must go
    assert list(cache.items) == ["d", "e"] and cache.nbytes == 960
    cache.put("f", item(100))  # larger than the whole budget: not kept, nothing evicted for it
    assert list(cache.items) == ["d", "e"]
