//! Images: decoding (JPEG, PNG, BMP, WebP through the `image` crate; grayscale, alpha
//! and 16-bit converted to 8-bit RGB), IDX files (MNIST, Fashion-MNIST; gzip or not), and
//! torchvision's transforms with its names and semantics, seeded so a run repeats.
//!
//! A transform pipeline works on 8-bit RGB images and ends in `Normalize`, which gives
//! the model's input: `(height, width, 3)` f32, channels last, `(x / 255 − mean) / std`.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use image::imageops::FilterType;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest image accepted, in pixels (a decompression bomb is refused before it is
/// decoded): 64 megapixels.
pub const MAX_PIXELS: u64 = 64 << 20;

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "webp"];

/// True when `path` has an image file's extension.
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A decoded image, 8-bit RGB, shared between the epochs that transform it.
pub type Image = Arc<RgbImage>;

/// Decodes image bytes (`name` for messages: the file, or the request). The format is
/// read from the bytes; anything that is not a complete image of a supported format is
/// an error naming `name`. Images over [`MAX_PIXELS`] are refused before decoding.
pub fn decode_bytes(bytes: &[u8], name: &Path) -> Result<Image> {
    decode_bytes_limited(bytes, name, MAX_PIXELS)
}

/// The decoder's limits for images of at most `max_pixels` (8 bytes a pixel: 16-bit RGBA,
/// the widest format decoded; never less than 1 MiB, for the decoders' own buffers).
fn limits(max_pixels: u64) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    limits
}

/// An image reader over `bytes` with its format guessed from them; an error naming
/// `name` when the bytes are of no supported format.
fn reader<'a>(
    bytes: &'a [u8],
    name: &Path,
    max_pixels: u64,
) -> Result<image::ImageReader<std::io::Cursor<&'a [u8]>>> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::file(name, format!("cannot read the image: {e}")))?;
    if reader.format().is_none() {
        return Err(Error::file(
            name,
            "not an image (expected JPEG, PNG, BMP or WebP)",
        ));
    }
    reader.limits(limits(max_pixels));
    Ok(reader)
}

/// `(width, height)` of the image in `bytes`, read from its header alone (nothing is
/// decoded): an error naming `name` when the bytes are not an image of a supported format.
pub fn dimensions(bytes: &[u8], name: &Path) -> Result<(u32, u32)> {
    reader(bytes, name, MAX_PIXELS)?
        .into_dimensions()
        .map_err(|e| Error::file(name, format!("cannot read the image: {e}")))
}

/// [`decode_bytes`] with a pixel cap of `max_pixels` (at most [`MAX_PIXELS`]): the size is
/// read from the header and an image over the cap is refused before it is decoded.
pub fn decode_bytes_limited(bytes: &[u8], name: &Path, max_pixels: u64) -> Result<Image> {
    let max_pixels = max_pixels.min(MAX_PIXELS);
    let (w, h) = dimensions(bytes, name)?;
    if w as u64 * h as u64 > max_pixels {
        return Err(Error::file(
            name,
            format!("image of {w}×{h} pixels is above the limit of {max_pixels}"),
        ));
    }
    let img = reader(bytes, name, max_pixels)?
        .decode()
        .map_err(|e| Error::file(name, format!("cannot decode the image: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::file(name, "empty image"));
    }
    Ok(Arc::new(img.to_rgb8()))
}

/// Reads and decodes the image file `path`.
pub fn decode_file(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_bytes(&bytes, path)
}

/// The image an example names: a file, or `FILE#N`, image `N` of an IDX file (the file
/// is read once and kept while any of its images is asked for in this process).
pub fn load(path: &Path) -> Result<Image> {
    let s = path.to_string_lossy();
    if let Some((file, n)) = s.rsplit_once('#') {
        if let Ok(n) = n.parse::<usize>() {
            let imgs = idx_cached(Path::new(file))?;
            return imgs.get(n).cloned().ok_or_else(|| {
                Error::file(
                    Path::new(file),
                    format!("no image {n}: the file holds {}", imgs.len()),
                )
            });
        }
    }
    decode_file(path)
}

type IdxCache = std::sync::Mutex<Option<(std::path::PathBuf, Arc<Vec<Image>>)>>;

/// The images of IDX file `path`, decoded once for the last file asked for.
fn idx_cached(path: &Path) -> Result<Arc<Vec<Image>>> {
    static CACHE: IdxCache = std::sync::Mutex::new(None);
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((p, imgs)) = c.as_ref() {
        if p == path {
            return Ok(imgs.clone());
        }
    }
    let imgs = Arc::new(read_idx_images(path)?);
    *c = Some((path.to_path_buf(), imgs.clone()));
    Ok(imgs)
}

/// True when `path` names an IDX image file (`…-idx3-ubyte`, optionally `.gz`).
pub fn is_idx_images(path: &Path) -> bool {
    let n = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    n.ends_with("idx3-ubyte") || n.ends_with("idx3-ubyte.gz")
}

/// The labels file beside IDX image file `path`: `images-idx3` → `labels-idx1` in its name.
pub fn idx_labels_path(path: &Path) -> Option<std::path::PathBuf> {
    let n = path.file_name()?.to_string_lossy();
    let l = n.replace("images-idx3", "labels-idx1");
    (l != n).then(|| path.with_file_name(l))
}

/// Number of images in IDX image file `path` (reads its header).
pub fn idx_count(path: &Path) -> Result<usize> {
    Ok(idx_cached(path)?.len())
}

/// Resize interpolation (torchvision's `InterpolationMode` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Nearest neighbour.
    Nearest,
    /// Bilinear (triangle filter, antialiased when shrinking).
    #[default]
    Bilinear,
    /// Bicubic (Catmull–Rom, a = −0.5, as PIL; antialiased when shrinking).
    Bicubic,
}

impl Interpolation {
    /// The name in timm's `pretrained_cfg.interpolation` (unknown names: bilinear).
    pub fn from_timm(name: &str) -> Interpolation {
        match name {
            "bicubic" => Interpolation::Bicubic,
            "nearest" => Interpolation::Nearest,
            _ => Interpolation::Bilinear,
        }
    }

    fn filter(self) -> FilterType {
        match self {
            Interpolation::Nearest => FilterType::Nearest,
            Interpolation::Bilinear => FilterType::Triangle,
            Interpolation::Bicubic => FilterType::CatmullRom,
        }
    }
}

/// One step of an image pipeline (torchvision's transforms of the same names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name")]
pub enum Transform {
    /// `Resize(size)`: the shorter side to `size`, the longer in proportion (truncated,
    /// as torchvision); `Resize((h, w))` with `height` and `width`.
    Resize {
        /// The shorter side's new length (when `height`/`width` are not given).
        #[serde(default)]
        size: Option<usize>,
        /// Exact height (with `width`).
        #[serde(default)]
        height: Option<usize>,
        /// Exact width (with `height`).
        #[serde(default)]
        width: Option<usize>,
        /// Interpolation.
        #[serde(default)]
        interpolation: Interpolation,
    },
    /// `CenterCrop(size)`: the middle `size × size` (padded with black when larger).
    CenterCrop {
        /// Side of the square crop.
        size: usize,
    },
    /// `RandomResizedCrop(size, scale, ratio)`: a random part of `scale` of the area and
    /// aspect `ratio` (log-uniform), resized to `size × size`.
    RandomResizedCrop {
        /// Output side.
        size: usize,
        /// Area fraction range.
        #[serde(default = "default_scale")]
        scale: [f64; 2],
        /// Aspect ratio range.
        #[serde(default = "default_ratio")]
        ratio: [f64; 2],
        /// Interpolation.
        #[serde(default)]
        interpolation: Interpolation,
    },
    /// `RandomHorizontalFlip(p)`.
    RandomHorizontalFlip {
        /// Probability of a flip.
        #[serde(default = "default_flip")]
        p: f64,
    },
}

fn default_scale() -> [f64; 2] {
    [0.08, 1.0]
}
fn default_ratio() -> [f64; 2] {
    [3.0 / 4.0, 4.0 / 3.0]
}
fn default_flip() -> f64 {
    0.5
}

impl Transform {
    /// True for the transforms that draw random numbers.
    pub fn is_random(&self) -> bool {
        matches!(
            self,
            Transform::RandomResizedCrop { .. } | Transform::RandomHorizontalFlip { .. }
        )
    }
}

/// A pipeline: the transforms in order, then `Normalize(mean, std)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    /// The transforms before normalisation.
    pub transforms: Vec<Transform>,
    /// Per-channel mean (of pixels scaled to 0..1).
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

impl Pipeline {
    /// timm's evaluation pipeline: `Resize(floor(size / crop_pct))`, `CenterCrop(size)`,
    /// `Normalize(mean, std)`.
    pub fn timm_eval(
        size: usize,
        crop_pct: f64,
        interpolation: Interpolation,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Pipeline {
        Pipeline {
            transforms: vec![
                Transform::Resize {
                    size: Some((size as f64 / crop_pct).floor() as usize),
                    height: None,
                    width: None,
                    interpolation,
                },
                Transform::CenterCrop { size },
            ],
            mean,
            std,
        }
    }

    /// timm's training pipeline without colour jitter: `RandomResizedCrop(size)`,
    /// `RandomHorizontalFlip()`, `Normalize(mean, std)`.
    pub fn timm_train(
        size: usize,
        interpolation: Interpolation,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Pipeline {
        Pipeline {
            transforms: vec![
                Transform::RandomResizedCrop {
                    size,
                    scale: default_scale(),
                    ratio: default_ratio(),
                    interpolation,
                },
                Transform::RandomHorizontalFlip { p: 0.5 },
            ],
            mean,
            std,
        }
    }

    /// The output's `(height, width)` for an input of `(h, w)`.
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let mut s = (h, w);
        for t in &self.transforms {
            s = match *t {
                Transform::Resize {
                    size,
                    height,
                    width,
                    ..
                } => resize_dims(s.0, s.1, size, height, width),
                Transform::CenterCrop { size } | Transform::RandomResizedCrop { size, .. } => {
                    (size, size)
                }
                Transform::RandomHorizontalFlip { .. } => s,
            }
        }
        s
    }

    /// Runs the pipeline on `img` and writes `(h, w, 3)` normalised values into `out`
    /// (which must have the room). `seed` drives the random transforms.
    pub fn apply_into(&self, img: &RgbImage, seed: u64, out: &mut [f32]) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut cur: Option<RgbImage> = None;
        for t in &self.transforms {
            let src = cur.as_ref().unwrap_or(img);
            let next = match *t {
                Transform::Resize {
                    size,
                    height,
                    width,
                    interpolation,
                } => {
                    let (h, w) = resize_dims(
                        src.height() as usize,
                        src.width() as usize,
                        size,
                        height,
                        width,
                    );
                    if (h, w) == (src.height() as usize, src.width() as usize) {
                        None
                    } else {
                        Some(image::imageops::resize(
                            src,
                            w as u32,
                            h as u32,
                            interpolation.filter(),
                        ))
                    }
                }
                Transform::CenterCrop { size } => Some(center_crop(src, size)),
                Transform::RandomResizedCrop {
                    size,
                    scale,
                    ratio,
                    interpolation,
                } => {
                    let (top, left, h, w) = random_crop_box(src, scale, ratio, &mut rng);
                    let part =
                        image::imageops::crop_imm(src, left as u32, top as u32, w as u32, h as u32)
                            .to_image();
                    Some(image::imageops::resize(
                        &part,
                        size as u32,
                        size as u32,
                        interpolation.filter(),
                    ))
                }
                Transform::RandomHorizontalFlip { p } => {
                    if rng.random::<f64>() < p {
                        Some(image::imageops::flip_horizontal(src))
                    } else {
                        None
                    }
                }
            };
            if let Some(n) = next {
                cur = Some(n);
            }
        }
        let src = cur.as_ref().unwrap_or(img);
        let n = src.width() as usize * src.height() as usize * 3;
        if out.len() < n {
            return Err(Error::Msg(format!(
                "image pipeline: {} values of room for a {}×{} image",
                out.len(),
                src.width(),
                src.height()
            )));
        }
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * self.std[c]));
        let shift: [f32; 3] = std::array::from_fn(|c| -self.mean[c] / self.std[c]);
        for (o, p) in out[..n].chunks_exact_mut(3).zip(src.pixels()) {
            for c in 0..3 {
                o[c] = p.0[c] as f32 * scale[c] + shift[c];
            }
        }
        Ok(())
    }
}

/// torchvision's `Resize` output size.
fn resize_dims(
    h: usize,
    w: usize,
    size: Option<usize>,
    height: Option<usize>,
    width: Option<usize>,
) -> (usize, usize) {
    match (height, width, size) {
        (Some(nh), Some(nw), _) => (nh, nw),
        (_, _, Some(s)) => {
            if h <= w {
                (s, (s as f64 * w as f64 / h as f64) as usize)
            } else {
                ((s as f64 * h as f64 / w as f64) as usize, s)
            }
        }
        _ => (h, w),
    }
}

/// torchvision's `CenterCrop`: offsets `round((size_in − size) / 2)` (Python's round), black padding
/// where the crop is larger than the image.
fn center_crop(src: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = (src.width() as i64, src.height() as i64);
    let s = size as i64;
    // Python's round: half to even.
    let top = ((h - s) as f64 / 2.0).round_ties_even() as i64;
    let left = ((w - s) as f64 / 2.0).round_ties_even() as i64;
    RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let (sx, sy) = (x as i64 + left, y as i64 + top);
        if sx >= 0 && sy >= 0 && sx < w && sy < h {
            *src.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at a box of random area and
/// log-uniform aspect ratio, then a center crop of the ratio clamped into range.
fn random_crop_box(
    img: &RgbImage,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut ChaCha8Rng,
) -> (usize, usize, usize, usize) {
    let (w, h) = (img.width() as f64, img.height() as f64);
    let area = w * h;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0]..=scale[1]);
        let aspect = rng.random_range(lr0..=lr1).exp();
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= w && ch <= h {
            let top = rng.random_range(0..=(h - ch) as usize);
            let left = rng.random_range(0..=(w - cw) as usize);
            return (top, left, ch as usize, cw as usize);
        }
    }
    let in_ratio = w / h;
    let (cw, ch) = if in_ratio < ratio[0] {
        (w, (w / ratio[0]).round())
    } else if in_ratio > ratio[1] {
        ((h * ratio[1]).round(), h)
    } else {
        (w, h)
    };
    let top = ((h - ch) / 2.0) as usize;
    let left = ((w - cw) / 2.0) as usize;
    (top, left, (ch as usize).max(1), (cw as usize).max(1))
}

/// The images of an IDX file (`idx3-ubyte`: magic 0x00000803, count, rows, columns, then
/// bytes), gzip-compressed or not, as grayscale → RGB images.
pub fn read_idx_images(path: &Path) -> Result<Vec<Image>> {
    let bytes = read_maybe_gzip(path)?;
    let dims = idx_header(&bytes, path, 3)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    let data = &bytes[16..];
    let each = rows * cols;
    Ok(data
        .chunks_exact(each)
        .take(n)
        .map(|px| {
            Arc::new(RgbImage::from_fn(cols as u32, rows as u32, |x, y| {
                let v = px[y as usize * cols + x as usize];
                image::Rgb([v, v, v])
            }))
        })
        .collect())
}

/// The labels of an IDX file (`idx1-ubyte`: magic 0x00000801, count, then bytes).
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_maybe_gzip(path)?;
    let dims = idx_header(&bytes, path, 1)?;
    Ok(bytes[8..8 + dims[0]].to_vec())
}

fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::file(path, format!("cannot decompress (gzip): {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Checks an IDX header of unsigned bytes with `rank` dimensions and a body of exactly
/// their product; returns the dimensions.
fn idx_header(bytes: &[u8], path: &Path, rank: usize) -> Result<Vec<usize>> {
    let head = 4 + 4 * rank;
    if bytes.len() < head {
        return Err(Error::file(
            path,
            format!(
                "IDX file of {} bytes is shorter than its header",
                bytes.len()
            ),
        ));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let want = 0x0800 + rank as u32;
    if magic != want {
        return Err(Error::file(
            path,
            format!(
                "IDX magic number {magic:#010x}, expected {want:#010x} (unsigned bytes, {rank} \
                 dimension{})",
                if rank == 1 { "" } else { "s" }
            ),
        ));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let body: usize = dims.iter().product();
    if bytes.len() - head != body {
        return Err(Error::file(
            path,
            format!(
                "IDX header says {dims:?} ({body} bytes of data) but the file holds {}",
                bytes.len() - head
            ),
        ));
    }
    Ok(dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic: u32, dims: &[u32], body: usize) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend((0..body).map(|i| (i % 251) as u8));
        v
    }

    /// The pixel cap is checked on the header alone: a PNG cut where its pixel data starts
    /// still gives its size, and over the cap it is refused as too large, not as truncated.
    #[test]
    fn the_pixel_cap_is_checked_before_decoding() {
        let img = RgbImage::from_pixel(10, 8, image::Rgb([9, 99, 199]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let name = Path::new("req");
        assert_eq!(dimensions(&png, name).unwrap(), (10, 8));
        let ok = decode_bytes_limited(&png, name, 80).unwrap();
        assert_eq!(ok.get_pixel(3, 3).0, [9, 99, 199]);
        // The bytes up to a few of the first IDAT chunk: the header, no pixel data.
        let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
        let head = &png[..idat + 8];
        assert_eq!(dimensions(head, name).unwrap(), (10, 8));
        let e = decode_bytes_limited(head, name, 79)
            .unwrap_err()
            .to_string();
        assert!(e.contains("10×8") && e.contains("limit of 79"), "{e}");
        let e = decode_bytes_limited(head, name, 80)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("req: cannot decode"), "{e}");
        let e = dimensions(b"hello, world", name).unwrap_err().to_string();
        assert!(e.contains("not an image"), "{e}");
    }

    /// IDX images and labels read back; a wrong magic number and a size that disagrees
    /// with the header are one-line errors naming the file.
    #[test]
    fn idx_files_read_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("imgs-idx3-ubyte");
        std::fs::write(&p, idx(0x803, &[2, 3, 4], 24)).unwrap();
        let imgs = read_idx_images(&p).unwrap();
        assert_eq!(imgs.len(), 2);
        assert_eq!((imgs[1].width(), imgs[1].height()), (4, 3));
        assert_eq!(imgs[1].get_pixel(1, 0).0, [13, 13, 13]);
        let gz = dir.path().join("labels-idx1-ubyte.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &idx(0x801, &[5], 5)).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert_eq!(read_idx_labels(&gz).unwrap(), vec![0, 1, 2, 3, 4]);
        std::fs::write(&p, idx(0x801, &[2, 3, 4], 24)).unwrap();
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(e.contains("imgs-idx3-ubyte") && e.contains("magic"), "{e}");
        std::fs::write(&p, idx(0x803, &[2, 3, 4], 23)).unwrap();
        let e = read_idx_images(&p).unwrap_err().to_string();
        assert!(
            e.contains("imgs-idx3-ubyte") && e.contains("holds 23"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    /// A truncated JPEG and a file that is not an image are errors naming the file.
    #[test]
    fn bad_images_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(20, 10, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let p = dir.path().join("ok.jpg");
        img.save(&p).unwrap();
        let back = decode_file(&p).unwrap();
        assert_eq!((back.width(), back.height()), (20, 10));
        let bytes = std::fs::read(&p).unwrap();
        let cut = dir.path().join("cut.jpg");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = decode_file(&cut).unwrap_err().to_string();
        assert!(e.contains("cut.jpg"), "{e}");
        let txt = dir.path().join("notes.png");
        std::fs::write(&txt, "hello, not an image").unwrap();
        let e = decode_file(&txt).unwrap_err().to_string();
        assert!(e.contains("notes.png") && e.contains("not an image"), "{e}");
        // Grayscale 16-bit and RGBA become 8-bit RGB.
        let g16 = image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(3, 2, image::Luma([65535]));
        let p16 = dir.path().join("g16.png");
        g16.save(&p16).unwrap();
        assert_eq!(
            decode_file(&p16).unwrap().get_pixel(0, 0).0,
            [255, 255, 255]
        );
    }

    /// torchvision's sizes: Resize keeps the aspect (truncating), CenterCrop takes the
    /// middle, a random crop stays in the image and repeats with its seed; Normalize
    /// maps 0..255 through mean and std.
    #[test]
    fn transforms_follow_torchvision() {
        assert_eq!(resize_dims(480, 640, Some(256), None, None), (256, 341));
        assert_eq!(resize_dims(427, 640, Some(253), None, None), (253, 379));
        let img = RgbImage::from_fn(9, 7, |x, y| image::Rgb([(x * 20) as u8, (y * 30) as u8, 0]));
        let c = center_crop(&img, 5);
        assert_eq!(c.get_pixel(0, 0).0, [40, 30, 0]);
        let p = Pipeline {
            transforms: vec![Transform::CenterCrop { size: 3 }],
            mean: [0.5; 3],
            std: [0.5; 3],
        };
        let mut out = vec![0f32; 27];
        p.apply_into(&img, 0, &mut out).unwrap();
        assert!((out[0] - (60.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
        // Python rounds half to even: (8 − 3) / 2 = 2.5 → 2.
        let even = RgbImage::from_fn(8, 3, |x, _| image::Rgb([x as u8, 0, 0]));
        assert_eq!(center_crop(&even, 3).get_pixel(0, 0).0, [2, 0, 0]);
        let train = Pipeline::timm_train(4, Interpolation::Bilinear, [0.0; 3], [1.0; 3]);
        assert_eq!(train.out_size(7, 9), (4, 4));
        let (mut a, mut b) = (vec![0f32; 48], vec![0f32; 48]);
        train.apply_into(&img, 7, &mut a).unwrap();
        train.apply_into(&img, 7, &mut b).unwrap();
        assert_eq!(a, b);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..100 {
            let (t, l, h, w) = random_crop_box(&img, default_scale(), default_ratio(), &mut rng);
            assert!(t + h <= 7 && l + w <= 9 && h > 0 && w > 0);
        }
    }
}
