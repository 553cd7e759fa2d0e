//! A multi-threaded prefetching batch loader: worker threads decode and transform samples, the epoch
//! order is shuffled under a seed, batches come out in order as NCHW f32 images and NxHxW labels.
//!
//! Determinism: the epoch permutation depends only on `(seed, epoch)` and each sample's augmentation
//! only on `(seed, epoch, dataset index)` (a ChaCha stream per sample), so the batches are identical
//! whatever the number of workers or the thread timing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::dataset::Dataset;
use crate::error::{DataError, ErrorPolicy, Result, SkippedSample};
use crate::sample::IGNORE_LABEL;
use crate::transform::{pad_float, pad_label, FloatImage, Normalization, Transform};

/// Loader settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Samples per batch (> 0).
    pub batch_size: usize,
    /// Decoding threads (> 0).
    pub num_workers: usize,
    /// Batches decoded ahead of the consumer (> 0).
    pub prefetch: usize,
    /// Shuffle the order every epoch.
    pub shuffle: bool,
    /// Drop a last batch smaller than `batch_size`.
    pub drop_last: bool,
    /// Seed of the shuffles and augmentations.
    pub seed: u64,
    /// The per-sample transform.
    pub transform: Transform,
    /// Input normalization.
    pub normalization: Normalization,
    /// What to do with samples that fail to load.
    pub policy: ErrorPolicy,
}

impl LoaderConfig {
    /// Training defaults: the official 513x513 augmentation, shuffling, dropping the last partial
    /// batch, 2 workers, 4 batches of prefetch, failing on bad samples.
    pub fn train(batch_size: usize, normalization: Normalization, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            num_workers: 2,
            prefetch: 4,
            shuffle: true,
            drop_last: true,
            seed,
            transform: Transform::Train(crate::transform::TrainTransform::official(normalization)),
            normalization,
            policy: ErrorPolicy::Fail,
        }
    }

    /// Evaluation defaults: dataset order, every sample, the given eval transform, skipping bad
    /// samples with a warning.
    pub fn eval(
        batch_size: usize,
        transform: crate::transform::EvalTransform,
        normalization: Normalization,
    ) -> Self {
        LoaderConfig {
            batch_size,
            num_workers: 2,
            prefetch: 4,
            shuffle: false,
            drop_last: false,
            seed: 0,
            transform: Transform::Eval(transform),
            normalization,
            policy: ErrorPolicy::SkipWithWarning,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.num_workers == 0 || self.prefetch == 0 {
            return Err(DataError::Config(format!(
                "batch_size {}, num_workers {} and prefetch {} must all be positive",
                self.batch_size, self.num_workers, self.prefetch
            )));
        }
        self.normalization.validate()
    }
}

/// A batch: `images` is `[n, 3, height, width]` normalized f32, `labels` `[n, height, width]` u8
/// (255 = ignore). Samples smaller than the batch's size are padded at the bottom/right (image with
/// the normalization's mean pixel, so 0 after normalization; label with 255).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// NCHW normalized images.
    pub images: Vec<f32>,
    /// NHW labels.
    pub labels: Vec<u8>,
    /// Number of samples.
    pub batch_size: usize,
    /// Height of every sample in the batch.
    pub height: usize,
    /// Width of every sample in the batch.
    pub width: usize,
    /// Sample ids.
    pub ids: Vec<String>,
    /// Dataset indices of the samples.
    pub indices: Vec<usize>,
    /// `(height, width)` of each sample's valid (unpadded) top-left region: the crop size in training,
    /// the original image size in evaluation.
    pub valid_sizes: Vec<(usize, usize)>,
    /// Samples of this batch left out under [`ErrorPolicy::SkipWithWarning`].
    pub skipped: Vec<String>,
}

impl Batch {
    /// The images as an `[n, 3, h, w]` F32 tensor and the labels as an `[n, h, w]` U32 tensor
    /// (255 = ignore) on `device`.
    pub fn to_tensors(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor)> {
        let images = candle_core::Tensor::from_slice(
            &self.images,
            (self.batch_size, 3, self.height, self.width),
            device,
        )?;
        let labels: Vec<u32> = self.labels.iter().map(|&v| v as u32).collect();
        let labels = candle_core::Tensor::from_vec(
            labels,
            (self.batch_size, self.height, self.width),
            device,
        )?;
        Ok((images, labels))
    }

    /// The label map of sample `i`.
    pub fn label(&self, i: usize) -> &[u8] {
        let plane = self.height * self.width;
        &self.labels[i * plane..(i + 1) * plane]
    }

    /// The normalized CHW image of sample `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        let plane = 3 * self.height * self.width;
        &self.images[i * plane..(i + 1) * plane]
    }
}

/// Iterates a dataset in batches over any number of epochs.
#[derive(Debug, Clone)]
pub struct Loader {
    dataset: Arc<Dataset>,
    config: LoaderConfig,
}

impl Loader {
    /// A loader over `dataset`; fails on an invalid configuration.
    pub fn new(dataset: impl Into<Arc<Dataset>>, config: LoaderConfig) -> Result<Self> {
        config.validate()?;
        Ok(Loader {
            dataset: dataset.into(),
            config,
        })
    }

    /// The dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Batches per epoch (before any skipped samples).
    pub fn num_batches(&self) -> usize {
        let n = self.dataset.len();
        let b = self.config.batch_size;
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample order of `epoch` (dataset indices).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
            rng.set_stream(epoch.wrapping_mul(2).wrapping_add(1));
            order.shuffle(&mut rng);
        }
        order
    }

    /// Starts the workers for `epoch` and returns the batch iterator. Dropping it stops the workers.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        let order = self.epoch_order(epoch);
        let b = self.config.batch_size;
        let mut batches: Vec<Vec<usize>> = order.chunks(b).map(<[usize]>::to_vec).collect();
        if self.config.drop_last && batches.last().is_some_and(|l| l.len() < b) {
            batches.pop();
        }
        let batches = Arc::new(batches);
        let shared = Arc::new(Shared {
            state: Mutex::new(Window {
                next_claim: 0,
                next_yield: 0,
            }),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let (tx, rx) = channel();
        let mut workers = Vec::new();
        for _ in 0..self.config.num_workers.min(batches.len().max(1)) {
            let tx = tx.clone();
            let shared = Arc::clone(&shared);
            let batches = Arc::clone(&batches);
            let dataset = Arc::clone(&self.dataset);
            let config = self.config.clone();
            workers.push(std::thread::spawn(move || {
                while let Some(bi) = shared.claim(batches.len(), config.prefetch) {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        build_batch(&dataset, &config, epoch, &batches[bi])
                    }))
                    .unwrap_or_else(|_| {
                        Err(DataError::Config(format!(
                            "a loader worker panicked while building batch {bi}"
                        )))
                    });
                    if tx.send((bi, result)).is_err() {
                        break;
                    }
                }
            }));
        }
        EpochIter {
            rx,
            pending: BTreeMap::new(),
            next: 0,
            total: batches.len(),
            shared,
            workers,
            skipped: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Window {
    next_claim: usize,
    next_yield: usize,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<Window>,
    cond: Condvar,
    stop: AtomicBool,
}

impl Shared {
    /// Claims the next batch index, waiting while it is more than `prefetch` ahead of the consumer.
    fn claim(&self, total: usize, prefetch: usize) -> Option<usize> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.stop.load(Ordering::SeqCst) || st.next_claim >= total {
                return None;
            }
            if st.next_claim < st.next_yield + prefetch {
                let i = st.next_claim;
                st.next_claim += 1;
                return Some(i);
            }
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn advance(&self, next_yield: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.next_yield = next_yield;
        self.cond.notify_all();
    }
}

type BatchResult = (
    usize,
    std::result::Result<(Batch, Vec<SkippedSample>), DataError>,
);

/// The batches of one epoch, in order. Yields `Err` for a sample that fails under
/// [`ErrorPolicy::Fail`] (the following batches still come).
#[derive(Debug)]
pub struct EpochIter {
    rx: Receiver<BatchResult>,
    pending: BTreeMap<usize, std::result::Result<(Batch, Vec<SkippedSample>), DataError>>,
    next: usize,
    total: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    skipped: Vec<SkippedSample>,
}

impl EpochIter {
    /// Samples skipped so far in this epoch (with [`ErrorPolicy::SkipWithWarning`]).
    pub fn skipped(&self) -> &[SkippedSample] {
        &self.skipped
    }

    /// Number of batches this epoch (an upper bound when samples get skipped).
    pub fn total_batches(&self) -> usize {
        self.total
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.next < self.total {
            let result = loop {
                if let Some(r) = self.pending.remove(&self.next) {
                    break r;
                }
                match self.rx.recv() {
                    Ok((i, r)) => {
                        self.pending.insert(i, r);
                    }
                    Err(_) => {
                        // every worker is gone without producing this batch: a worker panicked
                        self.next = self.total;
                        return Some(Err(DataError::Config(
                            "a loader worker thread stopped unexpectedly".into(),
                        )));
                    }
                }
            };
            self.next += 1;
            self.shared.advance(self.next);
            match result {
                Ok((batch, skipped)) => {
                    self.skipped.extend(skipped);
                    if batch.batch_size > 0 {
                        return Some(Ok(batch));
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
        None
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.cond.notify_all();
        // Unblock nothing else is needed: the channel is unbounded, so workers never block on send.
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// The RNG of one sample's augmentation in one epoch.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15);
    rng.set_stream((epoch << 32) ^ index as u64);
    rng
}

struct Prepared {
    id: String,
    index: usize,
    image: FloatImage,
    label: crate::sample::LabelMap,
    valid: (usize, usize),
}

fn prepare(dataset: &Dataset, config: &LoaderConfig, epoch: u64, index: usize) -> Result<Prepared> {
    let sample = dataset.load(index)?;
    let (image, label, valid) = match &config.transform {
        Transform::Train(t) => {
            let mut rng = sample_rng(config.seed, epoch, index);
            let (img, lab) = t.apply(&sample.image, &sample.label, &mut rng)?;
            let valid = (img.height, img.width);
            (img, lab, valid)
        }
        Transform::Eval(t) => t.apply(
            &sample.image,
            &sample.label,
            config.normalization.mean_pixel(),
        )?,
    };
    Ok(Prepared {
        id: sample.id,
        index,
        image,
        label,
        valid,
    })
}

fn build_batch(
    dataset: &Dataset,
    config: &LoaderConfig,
    epoch: u64,
    indices: &[usize],
) -> std::result::Result<(Batch, Vec<SkippedSample>), DataError> {
    let mut prepared = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    for &i in indices {
        match prepare(dataset, config, epoch, i) {
            Ok(p) => prepared.push(p),
            Err(e) if config.policy == ErrorPolicy::SkipWithWarning => {
                skipped.push(SkippedSample::warn(dataset.entries()[i].id.clone(), e))
            }
            Err(e) => return Err(e),
        }
    }
    let height = prepared.iter().map(|p| p.image.height).max().unwrap_or(0);
    let width = prepared.iter().map(|p| p.image.width).max().unwrap_or(0);
    let n = prepared.len();
    let plane = height * width;
    let mut images = vec![0.0f32; n * 3 * plane];
    let mut labels = vec![IGNORE_LABEL; n * plane];
    let pad_value = config.normalization.mean_pixel();
    let mut batch = Batch {
        images: Vec::new(),
        labels: Vec::new(),
        batch_size: n,
        height,
        width,
        ids: Vec::with_capacity(n),
        indices: Vec::with_capacity(n),
        valid_sizes: Vec::with_capacity(n),
        skipped: skipped.iter().map(|s| s.id.clone()).collect(),
    };
    for (k, p) in prepared.into_iter().enumerate() {
        let dst = &mut images[k * 3 * plane..(k + 1) * 3 * plane];
        if (p.image.height, p.image.width) == (height, width) {
            p.image.normalize_into(&config.normalization, dst)?;
            labels[k * plane..(k + 1) * plane].copy_from_slice(p.label.as_slice());
        } else {
            pad_float(&p.image, height, width, pad_value)
                .normalize_into(&config.normalization, dst)?;
            let lab = pad_label(&p.label, height, width);
            labels[k * plane..(k + 1) * plane].copy_from_slice(lab.as_slice());
        }
        batch.ids.push(p.id);
        batch.indices.push(p.index);
        batch.valid_sizes.push(p.valid);
    }
    batch.images = images;
    batch.labels = labels;
    Ok((batch, skipped))
}
