//! The input encoder: what turns examples into a model's input. The trainer, predictor
//! and server hold a `Box<dyn InputEncoder>` and never a tokenizer of their own, so a
//! family with another kind of input (pictures) brings its own encoder.

use candle_core::Device;
use tokenizers::Tokenizer;

use crate::data::batch::{make_batch, pad_id, tokenize, Features};
use crate::data::reader::Example;
use crate::data::tokenizer::load_tokenizer;
use crate::error::Result;
use crate::nn::Batch;

/// Examples in, batches out.
pub trait InputEncoder: Send + Sync {
    /// The items of `examples`, in order (tokenized once, up front).
    fn encode(&self, examples: &[Example]) -> Result<Vec<Features>>;

    /// [`InputEncoder::encode`] example by example: one that cannot be encoded (an image
    /// that does not decode) holds its error in its place, so that the caller may leave
    /// it out (`on_bad_row = "skip"`). An error of the whole call is one no example
    /// could get past.
    fn encode_each(&self, examples: &[Example]) -> Result<Vec<Result<Features>>> {
        Ok(self.encode(examples)?.into_iter().map(Ok).collect())
    }

    /// One batch of `items`, padded to the longest (dynamic padding).
    fn collate(&self, items: &[&Features], device: &Device) -> Result<Batch>;

    /// One training batch: as [`InputEncoder::collate`], with the training-time random
    /// transforms of an image encoder, item `i` seeded by `seed + i` (the trainer derives
    /// `seed` from the run's seed and step, so a resumed run draws the same).
    fn collate_train(&self, items: &[&Features], seed: u64, device: &Device) -> Result<Batch> {
        let _ = seed;
        self.collate(items, device)
    }

    /// An item's cost (its tokens), for length grouping and the server's batches.
    fn cost(&self, item: &Features) -> usize {
        item.ids.len()
    }

    /// The longest input, in tokens.
    fn max_len(&self) -> usize;

    /// An image encoder's evaluation pipeline (written to the export); `None` for text.
    fn image_eval(&self) -> Option<&crate::data::image::Pipeline> {
        None
    }

    /// The tokenizer, for the export and for telling a client its input's length; `None`
    /// for an encoder of images.
    fn tokenizer(&self) -> Option<&Tokenizer>;
}

/// Text through a Hugging Face tokenizer: every text family's encoder.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    pad: u32,
    max_len: usize,
}

impl TextEncoder {
    /// The tokenizer of model directory `dir`, truncating to `max_len` tokens.
    pub fn load(dir: &std::path::Path, max_len: usize) -> Result<TextEncoder> {
        Ok(TextEncoder::new(load_tokenizer(dir, max_len)?, max_len))
    }

    /// An encoder over `tokenizer` (already truncating to `max_len`).
    pub fn new(tokenizer: Tokenizer, max_len: usize) -> TextEncoder {
        TextEncoder {
            pad: pad_id(&tokenizer),
            tokenizer,
            max_len,
        }
    }

    /// The padding id.
    pub fn pad(&self) -> u32 {
        self.pad
    }
}

impl InputEncoder for TextEncoder {
    fn encode(&self, examples: &[Example]) -> Result<Vec<Features>> {
        tokenize(&self.tokenizer, examples)
    }

    fn collate(&self, items: &[&Features], device: &Device) -> Result<Batch> {
        make_batch(items, self.pad, device)
    }

    fn max_len(&self) -> usize {
        self.max_len
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        Some(&self.tokenizer)
    }
}

/// Images through a transform pipeline: every image family's encoder. An example's text
/// is its image file's path; images are decoded once, up front (in parallel), and kept
/// in memory; each batch runs the evaluation pipeline (training batches: the training
/// pipeline, seeded per batch by [`InputEncoder::collate_train`]). An example whose text
/// is `FILE#N` is image `N` of the IDX file `FILE`.
pub struct ImageEncoder {
    /// What evaluation, prediction and serving run.
    pub eval: crate::data::image::Pipeline,
    /// What training runs.
    pub train: crate::data::image::Pipeline,
}

impl ImageEncoder {
    /// timm's pipelines for a checkpoint's preprocessing: evaluation resizes to
    /// `size / crop_pct` and crops the centre; training takes a random resized crop and
    /// flips half the images.
    pub fn timm(p: &crate::families::ImagePreprocessing) -> ImageEncoder {
        use crate::data::image::{Interpolation, Pipeline};
        let interp = Interpolation::from_timm(&p.interpolation);
        ImageEncoder {
            eval: Pipeline::timm_eval(p.size.0, p.crop_pct, interp, p.mean, p.std),
            train: Pipeline::timm_train(p.size.0, interp, p.mean, p.std),
        }
    }

    /// A batch of `items` through `pipeline`, item `i` seeded by `seed + i`.
    fn batch(
        pipeline: &crate::data::image::Pipeline,
        items: &[&Features],
        seed: u64,
        device: &Device,
    ) -> Result<Batch> {
        use crate::error::Error;
        let mut size = None;
        let mut data = Vec::new();
        for (i, f) in items.iter().enumerate() {
            let img = f.image.as_ref().ok_or_else(|| {
                Error::Msg("an image model was given an item without an image".into())
            })?;
            let (h, w) = pipeline.out_size(img.height() as usize, img.width() as usize);
            if *size.get_or_insert((h, w)) != (h, w) {
                return Err(Error::Msg(format!(
                    "images of a batch come out of the transforms at different sizes ({:?} and \
                     {:?}); end the pipeline with a crop",
                    size.unwrap_or_default(),
                    (h, w)
                )));
            }
            let at = data.len();
            data.resize(at + h * w * 3, 0f32);
            pipeline.apply_into(img, seed.wrapping_add(i as u64), &mut data[at..])?;
        }
        let (h, w) = size.unwrap_or((0, 0));
        let pixels = candle_core::Tensor::from_vec(data, (items.len(), h, w, 3), device)?;
        Ok(Batch::Pixels(crate::nn::PixelBatch { pixels }))
    }
}

impl InputEncoder for ImageEncoder {
    fn encode(&self, examples: &[Example]) -> Result<Vec<Features>> {
        self.encode_each(examples)?.into_iter().collect()
    }

    /// Decodes the images in parallel, over as many threads as there are cores.
    fn encode_each(&self, examples: &[Example]) -> Result<Vec<Result<Features>>> {
        let paths: Vec<&std::path::Path> = examples
            .iter()
            .map(|e| std::path::Path::new(e.text.as_str()))
            .collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = paths.len().div_ceil(threads.max(1)).max(1);
        let parts: Vec<Result<Vec<Result<Features>>>> = std::thread::scope(|s| {
            let handles: Vec<_> = paths
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|p| {
                                Ok(Features {
                                    ids: Vec::new(),
                                    type_ids: Vec::new(),
                                    image: Some(crate::data::image::load(p)?),
                                })
                            })
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| crate::error::Error::Msg("image decoding failed".into()))
                })
                .collect()
        });
        let mut out = Vec::with_capacity(examples.len());
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }

    fn collate(&self, items: &[&Features], device: &Device) -> Result<Batch> {
        Self::batch(&self.eval, items, 0, device)
    }

    fn collate_train(&self, items: &[&Features], seed: u64, device: &Device) -> Result<Batch> {
        Self::batch(&self.train, items, seed, device)
    }

    /// Every image costs the same.
    fn cost(&self, _item: &Features) -> usize {
        1
    }

    /// The side of the model's input.
    fn max_len(&self) -> usize {
        self.eval.out_size(1, 1).0
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        None
    }

    fn image_eval(&self) -> Option<&crate::data::image::Pipeline> {
        Some(&self.eval)
    }
}

/// The images' pipelines a recipe asks for: the side, transforms and normalisation it
/// sets, the checkpoint's preprocessing for the rest (see [`ImageEncoder::timm`]).
#[derive(Debug, Clone, Default)]
pub struct ImageRecipe {
    /// Side of the model's input.
    pub size: Option<usize>,
    /// Training transforms.
    pub train: Option<Vec<crate::data::image::Transform>>,
    /// Evaluation transforms.
    pub eval: Option<Vec<crate::data::image::Transform>>,
    /// Normalisation mean.
    pub mean: Option<[f32; 3]>,
    /// Normalisation standard deviation.
    pub std: Option<[f32; 3]>,
}

impl ImageEncoder {
    /// The checkpoint's preprocessing `p` with the recipe's choices `r` over it.
    pub fn for_recipe(p: &crate::families::ImagePreprocessing, r: &ImageRecipe) -> ImageEncoder {
        let mut p = p.clone();
        if let Some(s) = r.size {
            p.size = (s, s);
        }
        if let Some(m) = r.mean {
            p.mean = m;
        }
        if let Some(s) = r.std {
            p.std = s;
        }
        let mut e = ImageEncoder::timm(&p);
        if let Some(t) = &r.train {
            e.train.transforms = t.clone();
        }
        if let Some(t) = &r.eval {
            e.eval.transforms = t.clone();
        }
        e
    }
}

/// The input encoder of a model of `family` in directory `dir` (config `cfg`): its
/// tokenizer truncating to `max_len`, or for an image family its pipelines (`image`: the
/// recipe's choices; an exported model's evaluation pipeline comes as `image.eval`).
pub fn encoder_for(
    family: &dyn crate::families::Family,
    cfg: &crate::families::HfConfig,
    dir: &std::path::Path,
    max_len: usize,
    image: &ImageRecipe,
) -> Result<Box<dyn InputEncoder>> {
    match family.image_preprocessing(cfg)? {
        Some(p) => Ok(Box::new(ImageEncoder::for_recipe(&p, image))),
        None => Ok(Box::new(TextEncoder::load(dir, max_len)?)),
    }
}
