//! `.npy` files, checked before they are trusted: the header must parse, the
//! dtype must be a float, and the data must be exactly as long as the
//! header's shape says, all before any array is allocated.

use std::fs::File;
use std::io::Read;
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

/// numpy itself refuses headers longer than 10000 bytes by default.
const MAX_HEADER_BYTES: usize = 65_536;
/// A valid header nests two levels (`{'shape': (1, 2)}`).
const MAX_HEADER_NESTING: usize = 8;
/// The most of a file read to find its header: the longest header, and
/// the fixed fields before it.
const HEAD_BYTES: u64 = MAX_HEADER_BYTES as u64 + 12;
/// The bytes read first, header or not: reading the longest header's worth
/// of every file of a ResNet50 dump copied 30 MB that the array is then
/// copied from a second time.
const FIRST_READ: u64 = 4096;

/// Refuses, before the header is parsed, what would make the parser
/// allocate or work without bound: an over-long header, or brackets nested
/// deeply (the literal parser takes exponential time on `[[[[...`; found by
/// fuzzing). Anything else malformed is left to the parser to describe.
fn check_header_text(bytes: &[u8]) -> Result<(), String> {
    let Some((start, length)) = declared_header(bytes) else {
        return Ok(());
    };
    if length > MAX_HEADER_BYTES {
        return Err(format!(
            "bad header: {length} bytes long, more than the {MAX_HEADER_BYTES} accepted"
        ));
    }
    let text = &bytes[start.min(bytes.len())..(start + length).min(bytes.len())];
    let (mut depth, mut deepest) = (0usize, 0usize);
    for &byte in text {
        match byte {
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > MAX_HEADER_NESTING {
        return Err(format!(
            "bad header: brackets nested {deepest} deep (a .npy header needs 2)"
        ));
    }
    Ok(())
}

/// Where the header text starts and how long the fixed fields before it
/// say it is, if `bytes` begin like a `.npy` file.
fn declared_header(bytes: &[u8]) -> Option<(usize, usize)> {
    let (Some(b"\x93NUMPY"), Some(&major)) = (bytes.get(..6), bytes.get(6)) else {
        return None;
    };
    match major {
        1 => bytes
            .get(8..10)
            .map(|b| (10, u16::from_le_bytes([b[0], b[1]]) as usize)),
        _ => bytes
            .get(8..12)
            .map(|b| (12, u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)),
    }
}

/// What a header says about the data after it.
struct DataLayout {
    shape: Vec<usize>,
    /// Little-endian f32 in C order, as numpy writes it on every common
    /// machine: the bytes are the values, and are read straight into place.
    native_f32: bool,
    /// 4 for f32, 8 for f64.
    element_size: u64,
    /// Where the data starts.
    offset: usize,
}

/// Parses and checks the header at the start of `bytes` (which may hold
/// only the header), against `data_size`, the number of bytes after it.
fn parse_header(bytes: &[u8], data_size: impl Fn(usize) -> u64) -> Result<DataLayout, String> {
    check_header_text(bytes)?;
    let mut rest = bytes;
    let header = Header::from_reader(&mut rest).map_err(|error| format!("bad header: {error}"))?;
    let offset = bytes.len() - rest.len();
    let data_size = data_size(offset);

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
    let little_endian =
        descriptor == "<f4" || (descriptor == "=f4" && cfg!(target_endian = "little"));
    Ok(DataLayout {
        shape: header.shape,
        native_f32: little_endian && cfg!(target_endian = "little") && !header.layout.is_fortran(),
        element_size,
        offset,
    })
}

/// Reads a float array into f32, in standard (C) order. f32 in either byte
/// order and Fortran order are read as they are; f64 is converted (and the
/// conversion reported); everything else is refused.
pub fn read_f32(path: &Path) -> Result<NpyArray, DumpError> {
    let io = |cause| DumpError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let npy = |reason| DumpError::Npy {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    // The header, never more than its limit: the file's size, not the
    // header, bounds what is read. A first read covers the headers numpy
    // writes (a few hundred bytes); a longer one takes a second.
    let mut head = Vec::new();
    (&mut file)
        .take(FIRST_READ.min(size))
        .read_to_end(&mut head)
        .map_err(io)?;
    if let Some((start, length)) = declared_header(&head) {
        let end = ((start + length) as u64).min(HEAD_BYTES).min(size);
        if end > head.len() as u64 {
            (&mut file)
                .take(end - head.len() as u64)
                .read_to_end(&mut head)
                .map_err(io)?;
        }
    }
    let layout = parse_header(&head, |offset| size - offset as u64).map_err(npy)?;
    if !layout.native_f32 {
        file.read_to_end(&mut head).map_err(io)?;
        return decode_f32(&head).map_err(npy);
    }
    // Straight into the array's memory: one copy from the file, no
    // intermediate bytes.
    let count = layout.shape.iter().product();
    let mut values = vec![0f32; count];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut values);
    let in_head = head.len() - layout.offset;
    bytes[..in_head].copy_from_slice(&head[layout.offset..]);
    file.read_exact(&mut bytes[in_head..]).map_err(io)?;
    let data = ArrayD::from_shape_vec(layout.shape, values)
        .map_err(|error| npy(format!("cannot read the data: {error}")))?;
    Ok(NpyArray {
        data,
        converted_from: None,
    })
}

/// [`read_f32`] on the bytes of a file; the error says what is wrong.
pub fn decode_f32(bytes: &[u8]) -> Result<NpyArray, String> {
    let layout = parse_header(bytes, |offset| (bytes.len() - offset) as u64)?;
    let data = &bytes[layout.offset..];
    if layout.native_f32 {
        let mut values = vec![0f32; data.len() / 4];
        bytemuck::cast_slice_mut::<f32, u8>(&mut values).copy_from_slice(data);
        let data = ArrayD::from_shape_vec(layout.shape, values)
            .map_err(|error| format!("cannot read the data: {error}"))?;
        return Ok(NpyArray {
            data,
            converted_from: None,
        });
    }
    let bad_data = |error: ndarray_npy::ReadNpyError| format!("cannot read the data: {error}");
    let (data, converted_from) = if layout.element_size == 4 {
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

/// `array` as the bytes numpy.save writes for it (format 1.0, `<f4`, C
/// order): the header dict, 21 - len(str(shape[0])) spaces numpy keeps for
/// growth, spaces and a newline to a multiple of 64 bytes, then the data.
pub fn encode_f32(array: ndarray::ArrayViewD<'_, f32>) -> Vec<u8> {
    let shape = array.shape();
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    if let Some(first) = dims.first() {
        dict.push_str(&" ".repeat(21usize.saturating_sub(first.len())));
    }
    // The magic string (6 bytes), the version (2) and the header length (2).
    const PREFIX: usize = 10;
    let padding = 64 - (PREFIX + dict.len() + 1) % 64;
    dict.push_str(&" ".repeat(padding));
    dict.push('\n');
    let mut bytes = Vec::with_capacity(PREFIX + dict.len() + array.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    for value in array.iter() {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn reads_a_plain_float32_array() {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let array = decode_f32(&npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n",
            &data,
        ))
        .unwrap();
        assert_eq!(array.data.shape(), &[2, 3]);
        assert_eq!(array.data[[1, 2]], 6.0);
        assert!(array.converted_from.is_none());
    }

    #[test]
    fn deeply_nested_headers_are_refused_at_once() {
        // Found by the npy fuzz target: this header took the literal parser
        // longer than the fuzzer's timeout.
        let header = format!("{{'': {}3),!}}': (2, 3{}", "[".repeat(20), "[".repeat(7));
        let started = std::time::Instant::now();
        let error = decode_f32(&npy(&header, &[0; 32])).unwrap_err();
        assert!(error.contains("nested"), "{error}");
        assert!(started.elapsed().as_secs() < 1);
    }

    #[test]
    fn a_huge_header_length_is_refused_before_allocating() {
        let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(b"{'descr'");
        let error = decode_f32(&bytes).unwrap_err();
        assert!(error.contains("4294967295 bytes long"), "{error}");
    }
}
