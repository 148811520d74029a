//! Where the scoring models come from: a local transformers folder (`config.json`,
//! `model.safetensors`, ...) or a hub id, downloaded into the usual hf-hub cache like the
//! base model (`HF_HUB_OFFLINE=1`: the cache only).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::loader::{looks_like_hub_id, offline, Hub};

/// One scoring model: how to name it in errors and which files it needs.
pub struct Wanted {
    /// "CLIP" or "DINOv2".
    pub what: &'static str,
    /// The command-line flag that names it.
    pub flag: &'static str,
    /// Besides config.json and model.safetensors.
    pub required: &'static [&'static str],
    pub optional: &'static [&'static str],
}

impl Wanted {
    /// The files a folder must hold, for messages.
    fn files(&self) -> String {
        let mut all = vec!["config.json", "model.safetensors"];
        all.extend(self.required);
        all.join(", ")
    }
}

/// Repos whose `main` has only pickled weights, and the revision holding the safetensors
/// conversion (openai's CLIP: its refs/pr/15, the one candle's examples read).
const SAFETENSORS_REVISIONS: [(&str, &str); 1] = [("openai/clip-vit-base-patch32", "refs/pr/15")];

/// A local folder, or `owner/name` / `owner/name@revision` from the hub.
pub fn resolve(spec: &str, w: &Wanted) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        check_folder(path, w)?;
        return Ok(path.to_path_buf());
    }
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (spec, None),
    };
    if !looks_like_hub_id(id) {
        return Err(Error::ModelNotFound(format!(
            "the {} model folder {spec} does not exist. Pass {} with a local transformers folder \
             ({}) or a hub id.",
            w.what,
            w.flag,
            w.files()
        )));
    }
    fetch(id, revision, w)
}

fn check_folder(dir: &Path, w: &Wanted) -> Result<()> {
    for f in ["config.json", "model.safetensors"]
        .iter()
        .chain(w.required)
    {
        if !dir.join(f).is_file() {
            return Err(Error::ModelNotFound(format!(
                "{} has no {f}: it is not a transformers {} folder. Pass {} with a folder holding \
                 {} (pickled .bin weights are never loaded).",
                dir.display(),
                w.what,
                w.flag,
                w.files()
            )));
        }
    }
    Ok(())
}

/// The snapshot folder of `id` with every file `w` needs.
fn fetch(id: &str, revision: Option<&str>, w: &Wanted) -> Result<PathBuf> {
    let known = SAFETENSORS_REVISIONS.iter().find(|(r, _)| *r == id);
    let revision = revision.or(known.map(|(_, rev)| *rev)).unwrap_or("main");
    let hub = Hub::new(id, revision).map_err(|e| hub_error(id, w, e))?;
    let get = |file: &str| hub.get(file).map_err(|e| hub_error(id, w, e));
    let mut root = None;
    for f in ["config.json", "model.safetensors"]
        .iter()
        .chain(w.required)
    {
        let p = get(f)?.ok_or_else(|| missing(id, revision, f, w))?;
        root = p.parent().map(Path::to_path_buf);
    }
    for f in w.optional {
        get(f)?;
    }
    root.ok_or_else(|| missing(id, revision, "config.json", w))
}

fn missing(id: &str, revision: &str, file: &str, w: &Wanted) -> Error {
    let how = if offline() {
        "HF_HUB_OFFLINE is set and the file is not in the local hub cache"
    } else {
        "the repo (at that revision) does not have it"
    };
    Error::ModelNotFound(format!(
        "{file} of {id}@{revision} could not be found ({how}). Pass {} with a local transformers {} \
         folder, or another hub id (owner/name or owner/name@revision).",
        w.flag, w.what
    ))
}

fn hub_error(id: &str, w: &Wanted, e: impl std::fmt::Display) -> Error {
    Error::ModelNotFound(format!(
        "could not fetch the {} model {id} from {} ({e}). Without network access, \
         download it elsewhere and pass its folder with {}.",
        w.what,
        crate::model::loader::hub_name(),
        w.flag
    ))
}
