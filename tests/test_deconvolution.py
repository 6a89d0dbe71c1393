"""Van Cittert deconvolution: convergence on a known blur, closed form = loop, constants kept."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from crossmoda_lib import deconvolution as dc


def _phantom() -> np.ndarray:
    """Sharp blocks and a sphere on a 24 x 48 x 48 grid (array order z, y, x)."""
    z, y, x = np.mgrid[:24, :48, :48]
    vol = np.zeros((24, 48, 48))
    vol[6:18, 10:22, 8:30] = 1.0
    vol[(z - 12) ** 2 / 16 + (y - 33) ** 2 / 36 + (x - 34) ** 2 / 36 < 1] = 0.6
    return vol


def test_error_to_the_sharp_image_falls_over_the_iterations():
    sharp = _phantom()
    sigma = np.array([1.2, 1.5, 1.5])
    blurred = ndimage.gaussian_filter(sharp, sigma, mode="reflect", truncate=dc.TRUNCATE)
    errors = [np.abs(dc.van_cittert(blurred, sigma, k) - sharp).mean() for k in (0, 1, 3, 7, 15)]
    assert errors[0] == pytest.approx(np.abs(blurred - sharp).mean(), rel=1e-5)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.7 * errors[0]  # measured 0.66: a Gaussian's high frequencies come back slowly


@pytest.mark.parametrize("shape, sigma, iterations, beta", [((20, 64, 64), (2.5, 1.67, 1.67), 15, 1.0), ((9, 31, 17), (0.8, 3.0, 0.5), 7, 1.5), ((5, 8, 6), (4.0, 4.0, 4.0), 15, 0.7)])
def test_closed_form_equals_the_loop(shape, sigma, iterations, beta):
    y = ndimage.gaussian_filter(np.random.default_rng(1).random(shape), 1.0)
    fast = dc.van_cittert(y.astype(np.float32), np.array(sigma), iterations, beta)
    loop = dc.van_cittert_loop(y, np.array(sigma), iterations, beta)
    assert fast.dtype == np.float32
    assert np.abs(fast - loop).max() <= 1e-5 * np.abs(loop).max()


def test_dct_eigenvalues_diagonalise_reflect_convolution():
    """Independently of the deconvolution: one blur step in the DCT domain = scipy's reflect filter."""
    import scipy.fft

    x = np.random.default_rng(2).random(37)
    kernel = dc.gaussian_kernel_1d(2.3)
    direct = ndimage.convolve1d(x, kernel, mode="reflect")
    via_dct = scipy.fft.idct(scipy.fft.dct(x, norm="ortho") * dc.dct_eigenvalues(kernel, 37), norm="ortho")
    np.testing.assert_allclose(via_dct, direct, atol=1e-12)


def test_a_constant_image_stays_constant():
    c = np.full((10, 20, 30), 0.7, dtype=np.float32)
    np.testing.assert_allclose(dc.van_cittert(c, np.array([2.5, 1.7, 1.7]), 15), 0.7, atol=1e-6)
    np.testing.assert_allclose(dc.van_cittert_loop(c, np.array([2.5, 1.7, 1.7]), 15), 0.7, atol=1e-12)


def test_psf_in_mm_sigma_or_fwhm():
    s = dc.psf_sigma_voxels((1.0, 1.0, 2.5), (0.6, 0.6, 1.0), "sigma")
    np.testing.assert_allclose(s, [1 / 0.6, 1 / 0.6, 2.5])
    f = dc.psf_sigma_voxels((1.0, 1.0, 2.5), (0.6, 0.6, 1.0), "fwhm")
    np.testing.assert_allclose(f * 2 * np.sqrt(2 * np.log(2)), s)
    with pytest.raises(ValueError, match="psf_is"):
        dc.psf_sigma_voxels((1, 1, 1), (1, 1, 1), "radius")


def test_deconvolve_image_keeps_geometry_and_uses_axis_order():
    """The PSF's z size applies along z: a blur along z only is undone along z only."""
    sharp = _phantom()
    blurred = ndimage.gaussian_filter(sharp, (2.5, 0, 0), mode="reflect", truncate=dc.TRUNCATE)
    image = sitk.GetImageFromArray(blurred.astype(np.float32))
    image.SetSpacing((0.6, 0.6, 1.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    out = dc.deconvolve_image(image, (0.0, 0.0, 2.5), 15, psf_is="sigma", clip=None)
    assert out.GetSpacing() == image.GetSpacing() and out.GetOrigin() == image.GetOrigin()
    restored = sitk.GetArrayFromImage(out)
    assert np.abs(restored - sharp).mean() < 0.7 * np.abs(blurred - sharp).mean()
    wrong_axis = sitk.GetArrayFromImage(dc.deconvolve_image(image, (2.5 * 0.6, 0.0, 0.0), 15, psf_is="sigma", clip=None))
    assert np.abs(restored - sharp).mean() < np.abs(wrong_axis - sharp).mean()
