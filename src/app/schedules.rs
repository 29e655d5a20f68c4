//! The schedule API of [`App`]: create, change, pause, resume, trigger,
//! delete and list schedules, and read a cron expression's next fires.

use chrono::{DateTime, Utc};

use super::{App, Call};
use crate::db;
use crate::error::Result;
use crate::schedule::{Fired, Schedule, ScheduleChange, ScheduleInfo};

impl App {
    /// Creates a schedule; resolves to its first fire time. A bad cron
    /// expression, an unknown time zone, workflow or queue, an input that is
    /// not a JSON object, or a name already taken is refused
    /// ([`Error::InvalidArgument`](crate::Error::InvalidArgument) with the
    /// character and the reason, [`Error::NotFound`](crate::Error::NotFound),
    /// [`Error::Conflict`](crate::Error::Conflict)) and nothing is stored.
    /// Needs `cairn_admin`.
    pub fn create_schedule(&self, mut schedule: Schedule) -> Call<'_, DateTime<Utc>> {
        Call::new(self.db(), move |conn| {
            Box::pin(async move {
                let input = std::mem::replace(&mut schedule.input, Ok(String::new()))?;
                db::create_schedule(conn, &schedule, &input).await
            })
        })
    }

    /// Changes a schedule (what `change` leaves unset is kept); resolves to
    /// its next fire time. Needs `cairn_admin`.
    pub fn update_schedule(
        &self,
        name: &str,
        mut change: ScheduleChange,
    ) -> Call<'_, DateTime<Utc>> {
        let name = name.to_owned();
        Call::new(self.db(), move |conn| {
            Box::pin(async move {
                let input = change.input.take().transpose()?;
                db::update_schedule(conn, &name, &change, input.as_deref()).await
            })
        })
    }

    /// Stops a schedule firing until [`resume_schedule`](Self::resume_schedule).
    pub fn pause_schedule(&self, name: &str) -> Call<'_, ()> {
        let name = name.to_owned();
        Call::new(self.db(), move |conn| {
            Box::pin(async move { db::pause_schedule(conn, &name).await })
        })
    }

    /// Lets a paused schedule fire again from its next tick (ticks that fell
    /// while it was paused are not fired); resolves to that tick.
    pub fn resume_schedule(&self, name: &str) -> Call<'_, DateTime<Utc>> {
        let name = name.to_owned();
        Call::new(self.db(), move |conn| {
            Box::pin(async move { db::resume_schedule(conn, &name).await })
        })
    }

    /// Deletes a schedule (the runs it started are kept); false if there was
    /// none.
    pub fn delete_schedule(&self, name: &str) -> Call<'_, bool> {
        let name = name.to_owned();
        Call::new(self.db(), move |conn| {
            Box::pin(async move { db::delete_schedule(conn, &name).await })
        })
    }

    /// Fires a schedule now, paused or not and whatever its overlap policy;
    /// its ticks are unchanged.
    pub fn trigger_schedule(&self, name: &str) -> Call<'_, Fired> {
        let name = name.to_owned();
        Call::new(self.db(), move |conn| {
            Box::pin(async move { db::trigger_schedule(conn, &name).await })
        })
    }

    /// Every schedule, by name.
    pub async fn list_schedules(&self) -> Result<Vec<ScheduleInfo>> {
        db::list_schedules(self.db()).await
    }

    /// The next `n` (1 to 1,000) fire times of a cron expression in an IANA
    /// time zone, from now on the database's clock.
    pub async fn next_fires(
        &self,
        cron: &str,
        timezone: &str,
        n: u32,
    ) -> Result<Vec<DateTime<Utc>>> {
        db::next_fires(self.db(), cron, timezone, n).await
    }

    /// Fires the due ticks of every schedule (at most 100) and says how
    /// many fired. Workers do this about once a second; this is for an
    /// installation that runs no worker, or a test.
    pub async fn tick_schedules(&self) -> Result<u32> {
        db::tick_schedules(self.db(), crate::worker::TICK_BATCH).await
    }

    /// Completes the flow signal steps whose timeout ran out (at most 100),
    /// each with `{"timeout": true}`, moves their runs on, and says how many.
    /// Workers do this about once a second, beside
    /// [`tick_schedules`](Self::tick_schedules).
    pub async fn fire_timers(&self) -> Result<u32> {
        db::fire_timers(self.db(), crate::worker::TICK_BATCH).await
    }
}
