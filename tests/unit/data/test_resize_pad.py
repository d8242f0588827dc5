"""``data.resize: pad``: the letterbox keeps a long piece's aspect ratio, on its own background."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from jewelclf import config as cfg
from jewelclf.data.images import decode_rgb, load_image, load_jpeg, resize_rgb
from jewelclf.data.letterbox import BORDER_SPREAD_MAX, background_colour, border_pixels, pad_square
from jewelclf.errors import JewelclfError
from jewelclf.export.serving import resize_batch


def _bar(h: int, w: int, thick: tuple[int, int], background=255, channels: int = 3) -> np.ndarray:
    """A black horizontal bar (rows ``thick[0]:thick[1]``) across a ``background`` image."""
    image = np.full((h, w, channels), background, np.uint8)
    image[thick[0]:thick[1]] = 0
    return image


def _png(pixels: np.ndarray, color: str) -> tf.Tensor:
    buf = io.BytesIO()
    Image.fromarray(pixels, color).save(buf, "PNG")
    return tf.constant(buf.getvalue())


def test_a_wide_bar_stays_a_thin_centred_bar():
    # 10 x 40 with a 4-row bar: on a 40 x 40 canvas it lies in rows 18..21, so at 20 px (an
    # exact 2x box filter) it is rows 9 and 10, white above and below. Squash would stretch it
    # to 8 of the 20 rows.
    out = resize_rgb(tf.constant(_bar(10, 40, (3, 7))), 20, "pad").numpy()
    expected = np.full((20, 20, 3), 255, np.uint8)
    expected[9:11] = 0
    np.testing.assert_array_equal(out, expected)
    squashed = resize_rgb(tf.constant(_bar(10, 40, (3, 7))), 20, "squash").numpy()
    assert (squashed[:, 0, 0] < 128).sum() == 8


def test_a_tall_piece_is_padded_left_and_right():
    tall = np.transpose(_bar(10, 40, (3, 7)), (1, 0, 2))  # a vertical bar, 40 x 10
    out = resize_rgb(tf.constant(tall), 20, "pad").numpy()
    np.testing.assert_array_equal(out, np.transpose(resize_rgb(tf.constant(_bar(10, 40, (3, 7))), 20, "pad").numpy(),
                                                    (1, 0, 2)))


def test_the_odd_margin_pixel_goes_to_the_bottom():
    canvas = pad_square(tf.constant(_bar(9, 12, (0, 9), 0)), tf.constant([7, 8, 9], tf.uint8)).numpy()
    assert canvas.shape == (12, 12, 3)
    assert (canvas[1:10] == 0).all()                        # the image: rows 1..9
    assert (canvas[[0, 10, 11]] == [7, 8, 9]).all()         # 1 margin row above, 2 below


@pytest.mark.parametrize("side, size", [(16, 8), (12, 20), (30, 24)])  # area, growth, bilinear
def test_a_square_image_is_what_squash_gives(side, size):
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    np.testing.assert_array_equal(resize_rgb(image, size, "pad").numpy(), resize_rgb(image, size, "squash").numpy())


def test_the_margins_take_a_uniform_border_colour():
    beige = (200, 180, 150)
    image = np.empty((8, 24, 3), np.uint8)
    image[:] = beige
    image[3:5, 2:22] = (20, 30, 40)  # the piece, off the border
    image[0, 5:9] = 0                # a chain end touching the edge does not change the colour
    out = resize_rgb(tf.constant(image), 24, "pad").numpy()
    assert (out[:8] == beige).all() and (out[-8:] == beige).all()
    assert (out[11:13, 4:20] == (20, 30, 40)).all()


def test_grey_background_gives_grey_padding():
    out = resize_rgb(tf.constant(_bar(10, 40, (3, 7), background=128)), 20, "pad").numpy()
    assert (out[:8] == 128).all() and (out[-8:] == 128).all()


def test_a_noisy_border_gives_white_padding():
    noise = np.random.default_rng(1).integers(0, 256, (8, 24, 3), dtype=np.uint8)
    out = resize_rgb(tf.constant(noise), 24, "pad").numpy()
    assert (out[:8] == 255).all() and (out[-8:] == 255).all()


def test_the_spread_threshold_is_where_white_takes_over():
    # Half of the border at 100, half at 100 + spread: the interquartile range is the spread.
    def colour(spread):
        border = np.array([[100]] * 50 + [[100 + spread]] * 50, np.uint8)
        return int(background_colour(tf.constant(border)).numpy()[0])
    assert colour(BORDER_SPREAD_MAX) != 255
    assert colour(BORDER_SPREAD_MAX + 1) == 255


def test_gray_input_comes_back_rgb_with_its_own_background():
    out = resize_rgb(tf.constant(_bar(10, 40, (3, 7), background=90, channels=1)), 20, "pad").numpy()
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    expected = np.full((20, 20, 3), 90, np.uint8)
    expected[9:11] = 0
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_it_runs_in_a_graph_with_unknown_sides(channels):
    fn = tf.function(lambda im: resize_rgb(im, 20, "pad"),
                     input_signature=[tf.TensorSpec([None, None, channels], tf.uint8)])
    rng = np.random.default_rng(2)
    for h, w in [(10, 40), (50, 13), (7, 7), (1, 30)]:
        image = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        image[:2], image[-2:], image[:, :2], image[:, -2:] = 60, 60, 60, 60
        got = fn(tf.constant(image)).numpy()
        np.testing.assert_array_equal(got, resize_rgb(tf.constant(image), 20, "pad").numpy())
        assert got.shape == (20, 20, 3)


def test_the_serving_graphs_map_fn_pads_each_image():
    # serving_pixels resizes a batch with tf.map_fn over resize_rgb: each image its own canvas.
    batch = np.stack([_bar(10, 40, (3, 7)), _bar(10, 40, (3, 7), background=128)])
    out = resize_batch(tf.constant(batch), 20, "pad").numpy()
    np.testing.assert_array_equal(out[0], resize_rgb(tf.constant(batch[0]), 20, "pad").numpy())
    assert (out[1, :8] == 128).all()


def test_load_image_pads_a_jpeg_as_resize_rgb_does():
    buf = io.BytesIO()
    Image.fromarray(_bar(40, 160, (12, 28), background=230)).save(buf, "JPEG", quality=95)
    data = tf.constant(buf.getvalue())
    expected = resize_rgb(decode_rgb(data), 32, "pad").numpy()
    np.testing.assert_array_equal(load_image(data, 32, "pad").numpy(), expected)
    np.testing.assert_array_equal(load_jpeg(data, 32, "pad").numpy(), expected)
    assert np.abs(expected[:10].astype(int) - 230).max() <= 2


@pytest.mark.parametrize("color", ["RGBA", "LA"])
@pytest.mark.parametrize("background_alpha", [0, 255])
def test_transparent_images_pad_as_if_composited_first(color, background_alpha):
    # load_image resizes premultiplied planes; their margins must hold the colour that pad
    # reads from the composited border: white under a transparent border, else the background.
    rng = np.random.default_rng(3)
    channels = 4 if color == "RGBA" else 2
    pixels = np.zeros((30, 90, channels), np.uint8)
    pixels[..., :-1] = (140, 90, 40) if color == "RGBA" else 140  # unequal: the planes' lanes
    pixels[..., -1] = background_alpha
    pixels[10:20, 5:85] = rng.integers(0, 256, (10, 80, channels), dtype=np.uint8)
    data = _png(pixels, color)
    expected = resize_rgb(decode_rgb(data), 32, "pad").numpy().astype(int)
    got = load_image(data, 32, "pad").numpy()
    assert np.abs(got.astype(int) - expected).max() <= 1
    background = pixels[0, 0, :-1] if background_alpha else 255
    assert (got[:8] == background).all() and (got[-8:] == background).all()


def test_border_pixels_are_the_outer_two_pixel_frame():
    image = np.zeros((6, 7, 1), np.uint8)
    image[2:4, 2:5] = 1  # the inside, not part of the frame
    frame = border_pixels(tf.constant(image)).numpy()
    assert frame.shape == (2 * 7 * 2 + 2 * 6 * 2, 1) and (frame == 0).all()


def test_config_accepts_pad_and_refuses_an_unknown_mode():
    assert cfg.resolve(None, {"data": {"resize": "pad"}}).data.resize == "pad"
    with pytest.raises(JewelclfError) as e:
        cfg.resolve(None, {"data": {"resize": "letterbox"}})
    assert str(e.value) == "config key 'data.resize' must be one of squash, crop, pad, got 'letterbox'"
