//! A stopped session's stored samples, labelled for the outside: device id,
//! replay mark, wall-clock time and time since the session started. What
//! GetSeries pages through and ExportSeries writes out.

use std::time::{Duration, SystemTime};

use crate::clock::Clock;
use crate::reading::Reading;
use crate::recorder::Point;

/// One sample as answered.
#[derive(Debug, Clone, Copy)]
pub struct SampleRow<'a> {
    pub device: &'a str,
    pub replay: bool,
    pub time: SystemTime,
    pub elapsed: Duration,
    pub reading: &'a Reading,
}

pub struct SeriesView<'a> {
    /// Per session device: its id and whether it is replayed.
    labels: Vec<(&'a str, bool)>,
    points: &'a [Point],
    started_at: Duration,
    clock: Clock,
}

impl<'a> SeriesView<'a> {
    pub fn new(
        labels: Vec<(&'a str, bool)>,
        points: &'a [Point],
        started_at: Duration,
        clock: Clock,
    ) -> Self {
        Self {
            labels,
            points,
            started_at,
            clock,
        }
    }

    pub fn row(&self, point: &'a Point) -> SampleRow<'a> {
        let (device, replay) = self.labels[usize::from(point.device)];
        SampleRow {
            device,
            replay,
            time: self.clock.wall(point.reading.at),
            elapsed: point.reading.at.saturating_sub(self.started_at),
            reading: &point.reading,
        }
    }

    /// Rows from the `skip`th point, of one session device or of all.
    pub fn rows(
        &self,
        device: Option<u16>,
        skip: usize,
    ) -> impl Iterator<Item = SampleRow<'a>> + '_ {
        self.points
            .iter()
            .filter(move |p| device.is_none_or(|d| p.device == d))
            .skip(skip)
            .map(|p| self.row(p))
    }
}
