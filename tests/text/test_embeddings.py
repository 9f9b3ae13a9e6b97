"""Textual-inversion files: ComfyUI's `embedding:` word split, lookup and file formats, and every refusal."""

import pytest
import torch
from safetensors.torch import save_file

from sdxl_core.text.embeddings import EmbeddingError, EmbeddingLibrary, read_embedding_file, split_embedding_words

L_WIDTH, G_WIDTH = 32, 64


def _sdxl_file(path, n=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = {"clip_l": torch.randn(n, L_WIDTH, generator=generator),
               "clip_g": torch.randn(n, G_WIDTH, generator=generator)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return tensors


# --- the word split (ComfyUI: re.split(' embedding:|\nembedding:') on each weighted segment) --------------------------

@pytest.mark.parametrize("segment, words", [
    ("a photo of embedding:cat", ["a photo of", "embedding:cat"]),
    ("embedding:cat sitting", ["embedding:cat sitting"]),
    ("x\nembedding:a embedding:b", ["x", "embedding:a", "embedding:b"]),
    ("photo,embedding:cat", ["photo,embedding:cat"]),  # not after a space: plain text, as in ComfyUI
    ("tab\tembedding:cat", ["tab\tembedding:cat"]),
    (" embedding:cat", ["embedding:cat"]),
    ("", []),
])
def test_words_are_cut_where_comfyui_cuts_them(segment, words):
    assert split_embedding_words(segment) == words


# --- lookup ---------------------------------------------------------------------------------------------------------

def test_name_with_or_without_extension_and_in_subfolders(tmp_path):
    cat = _sdxl_file(tmp_path / "cat.safetensors")
    dog = _sdxl_file(tmp_path / "pets" / "dog.safetensors", n=3, seed=1)
    library = EmbeddingLibrary([tmp_path])
    for name in ("cat", "cat.safetensors"):
        assert torch.equal(library.vectors(name, "clip_g", G_WIDTH), cat["clip_g"])
    for name in ("dog", "pets/dog", "pets/dog.safetensors"):
        assert torch.equal(library.vectors(name, "clip_l", L_WIDTH), dog["clip_l"])
    assert library.vectors("bird", "clip_g", G_WIDTH) is None
    assert library.names() == ["cat", "pets/dog"]


def test_extension_order_and_folder_order_decide(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    chosen = _sdxl_file(first / "cat.safetensors", seed=1)
    torch.save({"clip_g": torch.zeros(2, G_WIDTH)}, first / "cat.pt")
    _sdxl_file(second / "cat.safetensors", seed=2)
    _sdxl_file(first / "deeper" / "cat.safetensors", seed=3)
    got = EmbeddingLibrary([first, second]).vectors("cat", "clip_g", G_WIDTH)
    assert torch.equal(got, chosen["clip_g"])  # .safetensors before .pt, the first folder, the shallowest file
    other = EmbeddingLibrary([second, first]).vectors("cat", "clip_g", G_WIDTH)
    assert not torch.equal(other, chosen["clip_g"])


def test_same_name_in_two_subfolders_is_refused_not_picked_at_random(tmp_path):
    _sdxl_file(tmp_path / "x" / "cat.safetensors", seed=1)
    _sdxl_file(tmp_path / "y" / "cat.safetensors", seed=2)
    library = EmbeddingLibrary([tmp_path])
    with pytest.raises(EmbeddingError, match=r"several files.*embedding:subfolder/name"):
        library.vectors("cat", "clip_g", G_WIDTH)
    assert library.vectors("x/cat", "clip_g", G_WIDTH) is not None


def test_names_cannot_leave_their_folder(tmp_path):
    _sdxl_file(tmp_path / "outside.safetensors")
    inside = tmp_path / "embeddings"
    inside.mkdir()
    library = EmbeddingLibrary([inside])
    assert library.vectors("../outside", "clip_g", G_WIDTH) is None
    assert library.vectors(str(tmp_path / "outside"), "clip_g", G_WIDTH) is None


def test_missing_folder_and_bad_sources_are_refused(tmp_path):
    with pytest.raises(EmbeddingError, match="does not exist"):
        EmbeddingLibrary([tmp_path / "nowhere"])
    with pytest.raises(TypeError, match="a folder, a list of folders, a mapping"):
        EmbeddingLibrary.from_source(3)
    assert EmbeddingLibrary.from_source(None) is None


def test_missing_name_says_what_was_looked_for_and_what_exists(tmp_path):
    _sdxl_file(tmp_path / "cat.safetensors")
    with pytest.raises(EmbeddingError) as error:
        EmbeddingLibrary([tmp_path]).resolve("dog, red", "clip_g", G_WIDTH)
    message = str(error.value)
    assert "embedding:dog, which" in message and "dog.safetensors" in message and "available: cat" in message
    assert "refuses" in message
    with pytest.raises(EmbeddingError, match="must be followed by an embedding name"):
        EmbeddingLibrary([tmp_path]).resolve("  ", "clip_g", G_WIDTH)


def test_trailing_commas_are_dropped_and_kept_as_text(tmp_path):
    _sdxl_file(tmp_path / "cat.safetensors")
    library = EmbeddingLibrary([tmp_path])
    vectors, leftover = library.resolve("cat,, red car", "clip_g", G_WIDTH)
    assert vectors.shape == (2, G_WIDTH) and leftover == ",, red car"
    assert library.resolve("cat", "clip_g", G_WIDTH)[1] == ""
    assert library.resolve("cat\nblue", "clip_g", G_WIDTH)[1] == "blue"


def test_mapping_source_and_no_aliasing():
    tensor = torch.randn(3, G_WIDTH)
    library = EmbeddingLibrary.from_source({"style": {"clip_g": tensor}, "plain": torch.randn(G_WIDTH)})
    got = library.vectors("style.safetensors", "clip_g", G_WIDTH)
    assert torch.equal(got, tensor)
    got.zero_()
    assert tensor.abs().sum() > 0  # the caller's tensor is untouched
    assert library.vectors("plain", "clip_g", G_WIDTH).shape == (1, G_WIDTH)  # a 1-D tensor is one vector
    assert library.names() == ["plain", "style"]


# --- file formats (ComfyUI load_embed) ------------------------------------------------------------------------------

def test_a1111_pt_list_bin_bundled_and_single_tensor_files(tmp_path):
    a1111 = torch.randn(2, L_WIDTH)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(a1111)},
                "name": "style", "step": 3000}, tmp_path / "a1111.pt")
    listed = [{"a": torch.randn(1, L_WIDTH), "b": torch.randn(5)}, {"c": torch.randn(2, L_WIDTH)}]
    torch.save(listed, tmp_path / "listed.bin")
    bundle = {"bundle_emb.style.clip_l": torch.randn(2, L_WIDTH), "bundle_emb.style.clip_g": torch.randn(2, G_WIDTH),
              "lora_unet_down.lora_up.weight": torch.randn(4, 4)}
    save_file(bundle, str(tmp_path / "lora.safetensors"))
    single = torch.randn(4, L_WIDTH)
    save_file({"emb_params": single}, str(tmp_path / "sd15.safetensors"))
    library = EmbeddingLibrary([tmp_path])
    assert torch.equal(library.vectors("a1111", "clip_l", L_WIDTH), a1111)
    assert torch.equal(library.vectors("listed", "clip_l", L_WIDTH), torch.cat([listed[0]["a"], listed[1]["c"]]))
    assert torch.equal(library.vectors("lora", "clip_g", G_WIDTH), bundle["bundle_emb.style.clip_g"])
    assert torch.equal(library.vectors("sd15", "clip_l", L_WIDTH), single)


def test_pickle_needing_full_unpickling_is_refused(tmp_path):
    torch.save({"clip_g": torch.randn(2, G_WIDTH), "when": __import__("datetime").date(2024, 1, 1)},
               tmp_path / "unsafe.pt")
    with pytest.raises(EmbeddingError, match=r"weights_only=True.*arbitrary code"):
        read_embedding_file(tmp_path / "unsafe.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(EmbeddingError, match="not a readable safetensors"):
        read_embedding_file(tmp_path / "broken.safetensors")


@pytest.mark.parametrize("content, key, width, message", [
    ({"clip_l": torch.randn(2, L_WIDTH)}, "clip_g", G_WIDTH, r"no 'clip_g' of shape \[n, 64\].*'clip_l' \[2, 32\] "
                                                              r"only, made for the CLIP-L encoder"),
    ({"emb_params": torch.randn(2, 768)}, "clip_g", G_WIDTH, r"shape \[2, 768\].*SD1.5 embedding"),
    ({"clip_g": torch.randn(2, 48)}, "clip_g", G_WIDTH, r"'clip_g' tensor has shape \[2, 48\]; expected 'clip_g' "
                                                        r"of shape \[n, 64\] for the OpenCLIP bigG encoder"),
    ({"a": torch.randn(2, 64), "b": torch.randn(2, 64)}, "clip_g", G_WIDTH, r"it holds a \[2, 64\], b \[2, 64\]"),
    ({"clip_g": torch.zeros(2, G_WIDTH, dtype=torch.long)}, "clip_g", G_WIDTH, "floating-point"),
    ({"clip_g": torch.zeros(0, G_WIDTH)}, "clip_g", G_WIDTH, r"shape \[0, 64\]"),
])
def test_wrong_key_width_or_type_is_refused_with_what_was_expected(content, key, width, message):
    with pytest.raises(EmbeddingError, match=message):
        EmbeddingLibrary.from_source({"e": content}).vectors("e", key, width)


def test_the_available_list_follows_folder_links_as_the_lookup_does(tmp_path):
    from safetensors.torch import save_file

    from sdxl_core.text.embeddings import EmbeddingLibrary

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file({"clip_g": torch.zeros(1, 8)}, str(elsewhere / "linked.safetensors"))
    root = tmp_path / "embeddings"
    root.mkdir()
    save_file({"clip_g": torch.zeros(1, 8)}, str(root / "plain.safetensors"))
    (root / "more").symlink_to(elsewhere, target_is_directory=True)
    library = EmbeddingLibrary.from_source(root)
    assert library.names() == ["more/linked", "plain"]
    assert library.vectors("more/linked", "clip_g", 8).shape == (1, 8)
