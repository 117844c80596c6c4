//! Executes a network configuration list the way a container runtime does
//! (CNI spec section 3): plugins in order for ADD and CHECK, in reverse for
//! DEL, each given the runtime-derived configuration and the previous result.
//!
//! This is for operators and the quick start (Debian ships no `cnitool`); the
//! runtime's own libcni does this in production.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Map, Value};

/// What to run, against which attachment.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub args: String,
}

/// A plugin in the list failed: which one, and the error object it printed.
#[derive(Debug)]
pub struct ChainError {
    pub plugin: String,
    pub output: String,
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "plugin {} failed: {}", self.plugin, self.output.trim())
    }
}

/// Loads a `.conflist` file.
pub fn load(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if !v["plugins"].is_array() {
        return Err(format!("{}: no \"plugins\" list", path.display()));
    }
    Ok(v)
}

/// The configuration one plugin receives: its own object plus the list's
/// `name` and `cniVersion`, `capabilities` removed, `prevResult` inserted.
fn derive(
    list: &Value,
    plugin: &Value,
    prev: Option<&Value>,
    overrides: &Map<String, Value>,
) -> Value {
    let mut conf = plugin.clone();
    if let Some(obj) = conf.as_object_mut() {
        obj.remove("capabilities");
        obj.insert("name".into(), list["name"].clone());
        obj.insert("cniVersion".into(), list["cniVersion"].clone());
        if obj.get("type") == Some(&Value::from("nodeplane-cni")) {
            for (k, v) in overrides {
                obj.insert(k.clone(), v.clone());
            }
        }
        if let Some(p) = prev {
            obj.insert("prevResult".into(), p.clone());
        }
    }
    conf
}

fn exec(
    bin_dirs: &[PathBuf],
    verb: &str,
    conf: &Value,
    att: &Attachment,
) -> Result<String, ChainError> {
    let ty = conf["type"].as_str().unwrap_or_default().to_string();
    let bin = bin_dirs
        .iter()
        .map(|d| d.join(&ty))
        .find(|p| p.exists())
        .ok_or_else(|| ChainError {
            plugin: ty.clone(),
            output: format!("not found in {bin_dirs:?}"),
        })?;
    let path = bin_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mut child = Command::new(&bin)
        .env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", &att.container_id)
        .env("CNI_NETNS", &att.netns)
        .env("CNI_IFNAME", &att.ifname)
        .env("CNI_ARGS", &att.args)
        .env("CNI_PATH", path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| ChainError {
            plugin: ty.clone(),
            output: e.to_string(),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(conf.to_string().as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| ChainError {
        plugin: ty.clone(),
        output: e.to_string(),
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(ChainError {
            plugin: ty,
            output: stdout,
        })
    }
}

/// ADD through the whole list; returns the final result.
pub fn add(
    list: &Value,
    bin_dirs: &[PathBuf],
    att: &Attachment,
    overrides: &Map<String, Value>,
) -> Result<Value, ChainError> {
    let mut prev: Option<Value> = None;
    for plugin in list["plugins"].as_array().into_iter().flatten() {
        let conf = derive(list, plugin, prev.as_ref(), overrides);
        let out = exec(bin_dirs, "ADD", &conf, att)?;
        prev = Some(serde_json::from_str(&out).map_err(|e| ChainError {
            plugin: conf["type"].to_string(),
            output: format!("result is not JSON ({e}): {out}"),
        })?);
    }
    Ok(prev.unwrap_or(Value::Null))
}

/// DEL through the list in reverse, each plugin given the final ADD result.
pub fn del(
    list: &Value,
    bin_dirs: &[PathBuf],
    att: &Attachment,
    prev: Option<&Value>,
    overrides: &Map<String, Value>,
) -> Result<(), ChainError> {
    for plugin in list["plugins"].as_array().into_iter().flatten().rev() {
        exec(bin_dirs, "DEL", &derive(list, plugin, prev, overrides), att)?;
    }
    Ok(())
}
