//! `.npy` files, checked before they are trusted: the header must parse, the
//! dtype must be a float, and the data must be exactly as long as the
//! header's shape says, all before any array is allocated.

use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::npy::header::Header;
use ndarray_npy::ReadNpyExt;

use crate::DumpError;

/// An array read as f32, and the dtype it was converted from, if any.
#[derive(Debug)]
pub struct NpyArray {
    pub data: ArrayD<f32>,
    pub converted_from: Option<String>,
}

/// Reads a float array into f32, in standard (C) order. f32 in either byte
/// order and Fortran order are read as they are; f64 is converted (and the
/// conversion reported); everything else is refused.
pub fn read_f32(path: &Path) -> Result<NpyArray, DumpError> {
    // The whole file, never more: its size, not the header, bounds what is read.
    let bytes = std::fs::read(path).map_err(|source| DumpError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_f32(&bytes).map_err(|reason| DumpError::Npy {
        path: path.to_path_buf(),
        reason,
    })
}

/// [`read_f32`] on the bytes of a file; the error says what is wrong.
pub fn decode_f32(bytes: &[u8]) -> Result<NpyArray, String> {
    let mut rest = bytes;
    let header = Header::from_reader(&mut rest).map_err(|error| format!("bad header: {error}"))?;
    let data_size = rest.len() as u64;

    let descriptor = header.type_descriptor.to_string();
    let descriptor = descriptor.trim_matches(|c| c == '\'' || c == '"');
    let element_size: u64 = match descriptor {
        "<f4" | ">f4" | "=f4" => 4,
        "<f8" | ">f8" | "=f8" => 8,
        other => {
            return Err(format!(
                "dtype {other} is not supported (expected float32, or float64 to convert)"
            ))
        }
    };
    let expected = header
        .shape
        .iter()
        .try_fold(1u64, |product, &dim| product.checked_mul(dim as u64))
        .and_then(|count| count.checked_mul(element_size))
        .ok_or_else(|| format!("shape {:?} overflows", header.shape))?;
    if data_size != expected {
        return Err(format!(
            "shape {:?} of {descriptor} needs {expected} data bytes, the file holds {data_size}{}",
            header.shape,
            if data_size < expected {
                " (truncated?)"
            } else {
                ""
            }
        ));
    }

    let bad_data = |error: ndarray_npy::ReadNpyError| format!("cannot read the data: {error}");
    let (data, converted_from) = if element_size == 4 {
        (ArrayD::<f32>::read_npy(bytes).map_err(bad_data)?, None)
    } else {
        let wide = ArrayD::<f64>::read_npy(bytes).map_err(bad_data)?;
        (wide.mapv(|v| v as f32), Some("float64".to_string()))
    };
    let data = if data.is_standard_layout() {
        data
    } else {
        data.as_standard_layout().into_owned()
    };
    Ok(NpyArray {
        data,
        converted_from,
    })
}
