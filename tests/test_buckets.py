import pytest

from sdxl_core.buckets import SDXL_BUCKETS, bucket_by_label, bucket_for_ratio, nearest_bucket


def test_buckets_are_the_papers_forty_about_one_megapixel_in_steps_of_64():
    assert len(SDXL_BUCKETS) == 40
    assert len({(b.width, b.height) for b in SDXL_BUCKETS}) == 40
    for bucket in SDXL_BUCKETS:
        assert bucket.width % 64 == 0 and bucket.height % 64 == 0
        assert 0.9 * 1024**2 <= bucket.width * bucket.height <= 1024**2
    # The table runs from the widest to the tallest bucket, through 1024².
    ratios = [b.aspect_ratio for b in SDXL_BUCKETS]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] == 4.0 and ratios[-1] == 0.25
    assert (SDXL_BUCKETS[20].width, SDXL_BUCKETS[20].height) == (1024, 1024)


@pytest.mark.parametrize("ratio, expected", [
    ("1:1", (1024, 1024)), ("16:9", (1344, 768)), ("9:16", (768, 1344)), ("4:3", (1152, 896)),
    ("3:2", (1216, 832)), (1.0, (1024, 1024)), ("21:9", (1536, 640)), ("4:1", (2048, 512)),
])
def test_nearest_bucket_for_common_ratios(ratio, expected):
    bucket = bucket_for_ratio(ratio)
    assert (bucket.width, bucket.height) == expected


def test_nearest_bucket_for_a_requested_size_and_labels():
    assert (nearest_bucket(1920, 1080).width, nearest_bucket(1920, 1080).height) == (1344, 768)
    bucket = SDXL_BUCKETS[25]
    assert bucket_by_label(bucket.label) == bucket
    assert bucket_by_label("832x1216") == nearest_bucket(2, 3)


def test_bad_ratios_say_what_was_expected():
    with pytest.raises(ValueError, match="W:H"):
        bucket_for_ratio("wide")
    with pytest.raises(ValueError, match="positive"):
        nearest_bucket(0, 1)
    with pytest.raises(ValueError, match="training buckets"):
        bucket_by_label("1000x1000")
