//! Loading the VM files of `vms_dir` and the checks that span several VMs.

use std::collections::hash_map::{Entry, HashMap};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::error::{ConfigError, Duplicated, Position};
use super::raw::{Ctx, RawVm};
use super::{yaml, AgentConfig, VmConfig};

/// Values that must be unique, with where each was first declared.
pub(super) struct Seen {
    what: Duplicated,
    first: HashMap<String, Position>,
}

impl Seen {
    /// An empty set of `what`s.
    pub(super) fn new(what: Duplicated) -> Self {
        Self { what, first: HashMap::new() }
    }

    /// Records `value` declared at `at` under `key`; fails if it was declared before.
    pub(super) fn add(&mut self, value: &str, at: Position, key: String) -> Result<(), ConfigError> {
        match self.first.entry(value.to_owned()) {
            Entry::Vacant(entry) => {
                entry.insert(at);
                Ok(())
            }
            Entry::Occupied(entry) => Err(ConfigError::Duplicate {
                what: self.what,
                value: value.to_owned(),
                at,
                key,
                first: Box::new(entry.get().clone()),
            }),
        }
    }
}

/// What must be unique across all VMs: VM names, and images written to (writable disk images
/// and backup targets; read-only images may be shared).
pub(super) struct Registry {
    pub(super) vms: Seen,
    pub(super) images: Seen,
}

impl Default for Registry {
    fn default() -> Self {
        Self { vms: Seen::new(Duplicated::VmName), images: Seen::new(Duplicated::Image) }
    }
}

impl Registry {
    /// Records an already validated VM from `agent.yaml`; its lines are no longer known.
    fn add_known(&mut self, vm: &VmConfig, prefix: &str) -> Result<(), ConfigError> {
        let at = || Position::file(&vm.source);
        self.vms.add(&vm.name, at(), format!("{prefix}name"))?;
        for (i, disk) in vm.disks.iter().enumerate() {
            let key = format!("{prefix}disks[{i}]");
            if !disk.read_only {
                self.images.add(&disk.image.to_string(), at(), format!("{key}.image"))?;
            }
            if let Some(backup) = &disk.backup {
                self.images.add(&backup.target.to_string(), at(), format!("{key}.backup.target"))?;
            }
        }
        Ok(())
    }
}

impl AgentConfig {
    /// All VMs: those inline in `agent.yaml`, then every `*.yaml`/`*.yml` file in `vms_dir`
    /// sorted by file name (dot-files are skipped; a missing directory holds no VMs).
    ///
    /// VM names and writable images (disk images that are not `read_only`, backup targets)
    /// must be unique across all of them; a duplicate error names both files.
    pub fn load_vms(&self) -> Result<Vec<VmConfig>, ConfigError> {
        let mut registry = Registry::default();
        for (i, vm) in self.vms.iter().enumerate() {
            registry.add_known(vm, &format!("vms[{i}]."))?;
        }
        let mut vms = self.vms.clone();
        for path in vm_files(self.vms_dir.as_deref())? {
            let raw: RawVm = yaml::parse(&yaml::read(&path)?, &path)?;
            vms.push(raw.validate(&Ctx::new(&path), "", &mut registry)?);
        }
        Ok(vms)
    }
}

/// The VM files in `dir`, sorted.
fn vm_files(dir: Option<&Path>) -> Result<Vec<PathBuf>, ConfigError> {
    let Some(dir) = dir else {
        return Ok(Vec::new());
    };
    let io = |source| ConfigError::Io { path: dir.to_owned(), source };
    let entries = match fs::read_dir(dir) {
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        entries => entries.map_err(io)?,
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(io)?.path();
        if is_vm_file(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A regular file (or a link to one) named `*.yaml` or `*.yml`, not starting with `.`.
fn is_vm_file(path: &Path) -> bool {
    let visible = path.file_name().and_then(|name| name.to_str()).is_some_and(|name| !name.starts_with('.'));
    let yaml = path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml");
    visible && yaml && path.is_file()
}
