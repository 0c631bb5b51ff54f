//! The validated plan of an integration's file, for what the API derives from it: the
//! typed params a trigger is checked against, the next fire times, the step graph.
//!
//! The server reads the file the store says the integration was loaded from (so it works
//! the same beside `pipe serve`'s catalog or on another machine with the folder mounted),
//! and keeps each validated version until the file changes (size or modification time).

use crate::problem::{ApiResult, Problem};
use engine::plan::Plan;
use engine::step::Registry;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The most plans kept (one per integration file; a folder rarely has more).
const MAX_CACHED: usize = 10_000;

/// A validated file: its size and modification time when read, and its plan.
type Cached = (u64, Option<SystemTime>, Arc<Plan>);

pub(crate) struct Plans {
    registry: Arc<Registry>,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Plans {
    pub fn new(registry: Arc<Registry>) -> Plans {
        Plans {
            registry,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The integration's file as it is now, validated (blocking: call off the runtime).
    pub fn of(&self, i: &store::Integration) -> ApiResult<Arc<Plan>> {
        let path = i.path.as_deref().ok_or_else(|| {
            Problem::conflict(format!("integration `{}` has no loaded file", i.name))
        })?;
        let meta = std::fs::metadata(path).map_err(|e| {
            Problem::conflict(format!(
                "integration `{}`: its file {path} cannot be read here ({e})",
                i.name
            ))
        })?;
        let stamp = (meta.len(), meta.modified().ok());
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((len, modified, plan)) = cache.get(path) {
                if (*len, *modified) == stamp {
                    return Ok(plan.clone());
                }
            }
        }
        let outcome = engine::validate::validate_file(Path::new(path), path, &self.registry);
        let plan = Arc::new(outcome.plan.ok_or_else(|| {
            Problem::conflict(format!(
                "integration `{}`: {path} does not validate now; fix it first (`pipe validate {path}`)",
                i.name
            ))
        })?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(path.to_string(), (stamp.0, stamp.1, plan.clone()));
        Ok(plan)
    }

    /// The plan of a pipeline text a run kept (not cached: a run page asks once).
    pub fn of_text(&self, text: &str, path: &str) -> Option<Plan> {
        engine::validate::validate_text(text, Path::new(path), path, &self.registry).plan
    }
}
