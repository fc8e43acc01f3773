//! Writing one Parquet column with parquet's plain column writer (no arrow,
//! no codecs), for the exports that write Parquet files: the power
//! sampler's series and the CLI's runs. Only with the `parquet` feature.

use parquet::data_type::DataType;
use parquet::errors::ParquetError;
use parquet::file::writer::SerializedColumnWriter;

/// Writes a column with no nulls.
pub fn write_required<T: DataType>(
    column: &mut SerializedColumnWriter<'_>,
    values: Vec<T::T>,
) -> Result<(), ParquetError> {
    column
        .typed::<T>()
        .write_batch(&values, None, None)
        .map(drop)
}

/// Writes a column that may hold nulls: the values present, and a
/// definition level per row saying whether it has one.
pub fn write_optional<T: DataType>(
    column: &mut SerializedColumnWriter<'_>,
    values: impl Iterator<Item = Option<T::T>>,
) -> Result<(), ParquetError> {
    let (mut present, mut levels) = (Vec::new(), Vec::new());
    for value in values {
        levels.push(i16::from(value.is_some()));
        present.extend(value);
    }
    column
        .typed::<T>()
        .write_batch(&present, Some(&levels), None)
        .map(drop)
}
