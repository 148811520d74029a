//! The Hugging Face hub settings as Python's `huggingface_hub` reads them from the
//! environment, so magictailor shares a cluster's cache, mirror and token with the Python
//! tools (hf-hub, the crate, reads only `HF_HOME`):
//!
//! - cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, where
//!   `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, then `~/.cache/huggingface`;
//! - endpoint: `HF_ENDPOINT` (a mirror), else `https://huggingface.co`;
//! - token: `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the file `HF_TOKEN_PATH`
//!   (default `$HF_HOME/token`, what `huggingface-cli login` writes);
//! - offline: `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set to 1, ON, YES or TRUE.

use std::path::PathBuf;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where a setting came from, for `doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEnv {
    pub cache: PathBuf,
    /// The variable that set the cache folder, or "default".
    pub cache_from: String,
    pub endpoint: String,
    pub token: Option<String>,
    /// The variable or file the token came from.
    pub token_from: Option<String>,
    pub offline: bool,
}

impl HubEnv {
    /// This process's environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// The settings `var` gives (a variable's value, None when unset), reading a token
    /// file where no variable holds the token.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let home_dir = || std::env::home_dir().unwrap_or_default();
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home_dir().join(".cache"));
            cache.join("huggingface")
        });
        let (cache, cache_from) = match (var("HF_HUB_CACHE"), var("HUGGINGFACE_HUB_CACHE")) {
            (Some(c), _) => (PathBuf::from(c), "HF_HUB_CACHE".to_string()),
            (None, Some(c)) => (PathBuf::from(c), "HUGGINGFACE_HUB_CACHE".to_string()),
            (None, None) if var("HF_HOME").is_some() => (hf_home.join("hub"), "HF_HOME".into()),
            (None, None) => (hf_home.join("hub"), "default".into()),
        };
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into());
        let (token, token_from) = token(&var, &hf_home);
        let truthy = |v: Option<String>| {
            v.is_some_and(|v| ["1", "ON", "YES", "TRUE"].contains(&v.to_uppercase().as_str()))
        };
        let offline = truthy(var("HF_HUB_OFFLINE").or_else(|| var("TRANSFORMERS_OFFLINE")));
        Self {
            cache,
            cache_from,
            endpoint,
            token,
            token_from,
            offline,
        }
    }

    /// The cache as hf-hub takes it.
    pub fn cache(&self) -> hf_hub::Cache {
        hf_hub::Cache::new(self.cache.clone())
    }

    /// hf-hub's client with this cache, endpoint and token.
    pub fn api(&self) -> hf_hub::api::sync::ApiBuilder {
        hf_hub::api::sync::ApiBuilder::from_cache(self.cache())
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
    }
}

/// The token and where it came from.
fn token(
    var: &impl Fn(&str) -> Option<String>,
    hf_home: &std::path::Path,
) -> (Option<String>, Option<String>) {
    for name in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Some(t) = var(name) {
            return (Some(t.trim().to_string()), Some(name.into()));
        }
    }
    let file = var("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home.join("token"));
    match std::fs::read_to_string(&file) {
        Ok(t) if !t.trim().is_empty() => {
            (Some(t.trim().to_string()), Some(file.display().to_string()))
        }
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HubEnv {
        let map: HashMap<String, String> = (pairs.iter())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubEnv::from_vars(|k| map.get(k).cloned())
    }

    /// huggingface_hub's order: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    /// XDG_CACHE_HOME/huggingface/hub.
    #[test]
    fn the_cache_folder_follows_huggingface_hub() {
        let all = [
            ("HF_HUB_CACHE", "/a"),
            ("HUGGINGFACE_HUB_CACHE", "/b"),
            ("HF_HOME", "/c"),
            ("XDG_CACHE_HOME", "/d"),
        ];
        for (skip, want, from) in [
            (0, "/a", "HF_HUB_CACHE"),
            (1, "/b", "HUGGINGFACE_HUB_CACHE"),
            (2, "/c/hub", "HF_HOME"),
            (3, "/d/huggingface/hub", "default"),
        ] {
            let e = env(&all[skip..]);
            assert_eq!(
                (e.cache.to_str().unwrap(), e.cache_from.as_str()),
                (want, from)
            );
        }
    }

    /// HF_TOKEN, then HUGGING_FACE_HUB_TOKEN, then HF_TOKEN_PATH's file, then HF_HOME/token;
    /// HF_ENDPOINT without its trailing slash; offline only for 1/ON/YES/TRUE.
    #[test]
    fn token_endpoint_and_offline_follow_huggingface_hub() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        std::fs::write(dir.path().join("token"), "from-home\n").unwrap();
        let file = dir.path().join("other");
        std::fs::write(&file, " from-path ").unwrap();
        let path = file.to_str().unwrap();
        let e = env(&[
            ("HF_TOKEN", "a"),
            ("HUGGING_FACE_HUB_TOKEN", "b"),
            ("HF_HOME", home),
        ]);
        assert_eq!(e.token.as_deref(), Some("a"));
        let e = env(&[("HUGGING_FACE_HUB_TOKEN", "b"), ("HF_HOME", home)]);
        assert_eq!(e.token.as_deref(), Some("b"));
        let e = env(&[("HF_TOKEN_PATH", path), ("HF_HOME", home)]);
        assert_eq!(e.token.as_deref(), Some("from-path"));
        let e = env(&[("HF_HOME", home)]);
        assert_eq!(e.token.as_deref(), Some("from-home"));
        assert_eq!(env(&[("HF_HOME", "/nowhere")]).token, None);

        assert_eq!(env(&[]).endpoint, DEFAULT_ENDPOINT);
        assert_eq!(
            env(&[("HF_ENDPOINT", "https://hf-mirror.com/")]).endpoint,
            "https://hf-mirror.com"
        );
        for (v, off) in [
            ("1", true),
            ("yes", true),
            ("True", true),
            ("0", false),
            ("no", false),
        ] {
            assert_eq!(env(&[("HF_HUB_OFFLINE", v)]).offline, off, "{v}");
        }
        assert!(env(&[("TRANSFORMERS_OFFLINE", "1")]).offline);
    }
}
