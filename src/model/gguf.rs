//! GGUF file access for the model layer.
//!
//! Owns: opening a GGUF file through candle's `quantized::gguf_file` reader, typed access to its
//! metadata (with errors that name the key), and loading named tensors as `QTensor`s. Must never:
//! dequantise weights (the forward pass decides what stays quantised) or interpret architecture
//! hyperparameters (that is [`super::llama`]'s job).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use super::error::{ModelError, Result};

/// An open GGUF file: parsed header plus a reader for tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("metadata_keys", &self.content.metadata.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens `path` and parses the GGUF header (metadata and tensor directory).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)?;
        Ok(Self {
            path,
            content,
            reader,
        })
    }

    /// The parsed header.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a tensor of that name exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The shape of a tensor as candle reports it (outermost dimension first).
    pub fn tensor_shape(&self, name: &str) -> Result<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| t.shape.dims().to_vec())
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// Loads a tensor onto `device`, keeping its GGUF quantisation.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(ModelError::MissingTensor(name.to_string()));
        }
        Ok(self.content.tensor(&mut self.reader, name, device)?)
    }
}

fn bad(key: &str, reason: impl std::fmt::Display) -> ModelError {
    ModelError::BadMetadata {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

/// A metadata value, or `MissingMetadata`.
pub(crate) fn get<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))
}

/// A string metadata value.
pub(crate) fn metadata_str<'a>(content: &'a Content, key: &str) -> Result<&'a str> {
    get(content, key)?
        .to_string()
        .map(|s| s.as_str())
        .map_err(|e| bad(key, e))
}

/// Any non-negative integer value as `u32`.
pub(crate) fn value_u32(v: &Value, key: &str) -> Result<u32> {
    let wide: i128 = match v {
        Value::U8(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::U64(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        other => {
            return Err(bad(
                key,
                format!("expected an integer, found {:?}", other.value_type()),
            ))
        }
    };
    u32::try_from(wide).map_err(|_| bad(key, format!("{wide} does not fit in u32")))
}

/// A required integer metadata value.
pub(crate) fn get_u32(content: &Content, key: &str) -> Result<u32> {
    value_u32(get(content, key)?, key)
}

/// An optional integer metadata value.
pub(crate) fn get_u32_opt(content: &Content, key: &str) -> Result<Option<u32>> {
    content
        .metadata
        .get(key)
        .map(|v| value_u32(v, key))
        .transpose()
}

/// An optional float metadata value (f32 or f64 in the file).
pub(crate) fn get_f32_opt(content: &Content, key: &str) -> Result<Option<f32>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(Value::F32(x)) => Ok(Some(*x)),
        Some(Value::F64(x)) => Ok(Some(*x as f32)),
        Some(other) => Err(bad(
            key,
            format!("expected a float, found {:?}", other.value_type()),
        )),
    }
}

/// A required array-of-strings metadata value.
pub(crate) fn get_string_array(content: &Content, key: &str) -> Result<Vec<String>> {
    let arr = get(content, key)?.to_vec().map_err(|e| bad(key, e))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.to_string()
                .cloned()
                .map_err(|e| bad(key, format!("element {i}: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_u32_accepts_integers_and_rejects_others() {
        assert_eq!(value_u32(&Value::U64(7), "k").unwrap(), 7);
        assert_eq!(value_u32(&Value::I32(3), "k").unwrap(), 3);
        assert!(matches!(
            value_u32(&Value::I32(-1), "k"),
            Err(ModelError::BadMetadata { .. })
        ));
        assert!(matches!(
            value_u32(&Value::U64(1 << 40), "k"),
            Err(ModelError::BadMetadata { .. })
        ));
        assert!(matches!(
            value_u32(&Value::F32(1.0), "k"),
            Err(ModelError::BadMetadata { .. })
        ));
    }
}
