//! A labelled grid of images: a title, a header per column, a label above each row.

use image::RgbImage;
use plotters::prelude::*;

use super::{font, FONT_FAMILY};
use crate::error::{Error, Result};

const MARGIN: u32 = 8;
const GAP: u32 = 4;
const TITLE: u32 = 26;
const LABEL: u32 = 20;
/// Narrow cells (tiny models) still leave room for the labels.
const MIN_WIDTH: u32 = 420;

/// Row-major `cells`, one row per `rows` label and one column per `cols` label, all of
/// one size.
pub struct Grid<'a> {
    pub title: &'a str,
    pub rows: &'a [String],
    pub cols: &'a [String],
    pub cells: &'a [RgbImage],
}

impl Grid<'_> {
    /// The cells' size.
    fn cell(&self) -> Result<(u32, u32)> {
        let first = self
            .cells
            .first()
            .ok_or_else(|| Error::internal("an empty grid"))?;
        let size = first.dimensions();
        let n = self.rows.len() * self.cols.len();
        if self.cells.len() != n || self.cells.iter().any(|c| c.dimensions() != size) {
            return Err(Error::internal(format!(
                "a grid of {} x {} needs {n} cells of one size",
                self.rows.len(),
                self.cols.len()
            )));
        }
        Ok(size)
    }

    /// The canvas size for these cells.
    pub fn size(&self) -> Result<(u32, u32)> {
        let (cw, ch) = self.cell()?;
        let (r, c) = (self.rows.len() as u32, self.cols.len() as u32);
        let w = (2 * MARGIN + c * cw + (c - 1) * GAP).max(MIN_WIDTH);
        let h = 2 * MARGIN + TITLE + LABEL + r * (LABEL + ch) + (r - 1) * GAP;
        Ok((w, h))
    }

    pub fn render(&self) -> Result<RgbImage> {
        font()?;
        let (cw, _) = self.cell()?;
        let (w, h) = self.size()?;
        let mut buf = vec![255u8; (w * h * 3) as usize];
        self.draw_labels(&mut buf, (w, h), cw)?;
        let mut canvas =
            RgbImage::from_raw(w, h, buf).ok_or_else(|| Error::internal("grid buffer size"))?;
        for (i, cell) in self.cells.iter().enumerate() {
            let (r, c) = (i / self.cols.len(), i % self.cols.len());
            let x = MARGIN + c as u32 * (cw + GAP);
            let y = self.row_top(r) + LABEL;
            image::imageops::replace(&mut canvas, cell, x as i64, y as i64);
        }
        Ok(canvas)
    }

    fn row_top(&self, r: usize) -> u32 {
        let ch = self.cells.first().map_or(0, |c| c.height());
        MARGIN + TITLE + LABEL + r as u32 * (LABEL + ch + GAP)
    }

    fn draw_labels(&self, buf: &mut [u8], size: (u32, u32), cw: u32) -> Result<()> {
        let fail = |e: &dyn std::fmt::Display| Error::internal(format!("drawing a grid: {e}"));
        let area = BitMapBackend::with_buffer(buf, size).into_drawing_area();
        let title = (FONT_FAMILY, 18).into_font().color(&BLACK);
        let label = (FONT_FAMILY, 14).into_font().color(&RGBColor(60, 60, 60));
        let m = MARGIN as i32;
        area.draw_text(self.title, &title, (m, m))
            .map_err(|e| fail(&e))?;
        for (c, text) in self.cols.iter().enumerate() {
            let x = m + (c as u32 * (cw + GAP)) as i32;
            area.draw_text(text, &label, (x, m + TITLE as i32))
                .map_err(|e| fail(&e))?;
        }
        for (r, text) in self.rows.iter().enumerate() {
            let y = self.row_top(r) as i32 + 2;
            area.draw_text(text, &label, (m, y)).map_err(|e| fail(&e))?;
        }
        area.present().map_err(|e| fail(&e))
    }
}
