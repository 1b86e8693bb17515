//! `.npy` files, checked before they are trusted: the header must parse, the
//! dtype must be a float, and the data must be exactly as long as the
//! header's shape says, all before any array is allocated.

use std::fs::File;
use std::io::{BufReader, Read};
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
    let io = |source| DumpError::Io {
        path: path.to_path_buf(),
        source,
    };
    let invalid = |reason: String| DumpError::Npy {
        path: path.to_path_buf(),
        reason,
    };

    let file = File::open(path).map_err(io)?;
    let file_size = file.metadata().map_err(io)?.len();
    let mut counting = CountingReader {
        inner: BufReader::new(file),
        count: 0,
    };
    let header = Header::from_reader(&mut counting)
        .map_err(|error| invalid(format!("bad header: {error}")))?;
    let header_size = counting.count;

    let descriptor = header.type_descriptor.to_string();
    let descriptor = descriptor.trim_matches(|c| c == '\'' || c == '"');
    let element_size: u64 = match descriptor {
        "<f4" | ">f4" | "=f4" => 4,
        "<f8" | ">f8" | "=f8" => 8,
        other => {
            return Err(invalid(format!(
                "dtype {other} is not supported (expected float32, or float64 to convert)"
            )))
        }
    };
    let elements = header
        .shape
        .iter()
        .try_fold(1u64, |product, &dim| product.checked_mul(dim as u64))
        .and_then(|count| count.checked_mul(element_size))
        .ok_or_else(|| invalid(format!("shape {:?} overflows", header.shape)))?;
    let data_size = file_size - header_size.min(file_size);
    if data_size != elements {
        return Err(invalid(format!(
            "shape {:?} of {descriptor} needs {elements} data bytes, the file holds {data_size}{}",
            header.shape,
            if data_size < elements {
                " (truncated?)"
            } else {
                ""
            }
        )));
    }

    let reopened = BufReader::new(File::open(path).map_err(io)?);
    let bad_data =
        |error: ndarray_npy::ReadNpyError| invalid(format!("cannot read the data: {error}"));
    let (data, converted_from) = if element_size == 4 {
        (ArrayD::<f32>::read_npy(reopened).map_err(bad_data)?, None)
    } else {
        let wide = ArrayD::<f64>::read_npy(reopened).map_err(bad_data)?;
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

struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.count += read as u64;
        Ok(read)
    }
}
