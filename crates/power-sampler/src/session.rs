//! The sessions of the service: open ones (bounded by `max_sessions`) and the
//! most recent stopped ones (bounded by `max_stopped_sessions`, oldest
//! forgotten first), and the errors for asking the wrong thing of either.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use berth_server::CancellationToken;

use crate::error::PowerError;
use crate::recorder::{DeviceOutcome, Point, Recorder};

/// What a session was asked for, and when it started.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: String,
    pub run_id: String,
    /// Indices into the device registry.
    pub devices: Vec<usize>,
    pub rate_hz: f64,
    pub idle_baseline: Duration,
    /// Start of the measurement (after the idle baseline), on the service clock.
    pub started_at: Duration,
}

pub struct OpenSession {
    pub info: SessionInfo,
    pub recorder: Arc<Recorder>,
    /// Cancelled when the session stops, ending its live streams.
    pub ended: CancellationToken,
}

#[derive(Debug)]
pub struct StoppedSession {
    pub info: SessionInfo,
    pub stopped_at: Duration,
    pub devices: Vec<DeviceOutcome>,
    pub series: Arc<Vec<Point>>,
    pub truncated: bool,
}

pub struct Sessions {
    open: HashMap<String, OpenSession>,
    stopped: HashMap<String, StoppedSession>,
    stopped_order: VecDeque<String>,
    max_open: usize,
    max_stopped: usize,
}

impl Sessions {
    pub fn new(max_open: usize, max_stopped: usize) -> Self {
        Self {
            open: HashMap::new(),
            stopped: HashMap::new(),
            stopped_order: VecDeque::new(),
            max_open,
            max_stopped,
        }
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Room for one more open session, or why not.
    pub fn check_room(&self) -> Result<(), PowerError> {
        if self.open.len() >= self.max_open {
            return Err(PowerError::TooManySessions {
                limit: self.max_open,
            });
        }
        Ok(())
    }

    pub fn insert_open(&mut self, session: OpenSession) -> Result<(), PowerError> {
        self.check_room()?;
        self.open.insert(session.info.id.clone(), session);
        Ok(())
    }

    pub fn open(&self, id: &str) -> Result<&OpenSession, PowerError> {
        match self.open.get(id) {
            Some(session) => Ok(session),
            None if self.stopped.contains_key(id) => Err(PowerError::NotOpen(id.to_string())),
            None => Err(PowerError::UnknownSession(id.to_string())),
        }
    }

    pub fn open_mut(&mut self, id: &str) -> Option<&mut OpenSession> {
        self.open.get_mut(id)
    }

    /// Removes an open session to stop it.
    pub fn take_open(&mut self, id: &str) -> Result<OpenSession, PowerError> {
        match self.open.remove(id) {
            Some(session) => Ok(session),
            None if self.stopped.contains_key(id) => {
                Err(PowerError::AlreadyStopped(id.to_string()))
            }
            None => Err(PowerError::UnknownSession(id.to_string())),
        }
    }

    /// Keeps a stopped session, forgetting the oldest beyond the bound.
    pub fn insert_stopped(&mut self, session: StoppedSession) {
        let id = session.info.id.clone();
        self.stopped.insert(id.clone(), session);
        self.stopped_order.push_back(id);
        while self.stopped_order.len() > self.max_stopped {
            if let Some(oldest) = self.stopped_order.pop_front() {
                self.stopped.remove(&oldest);
            }
        }
    }

    pub fn stopped(&self, id: &str) -> Result<&StoppedSession, PowerError> {
        match self.stopped.get(id) {
            Some(session) => Ok(session),
            None if self.open.contains_key(id) => Err(PowerError::StillOpen(id.to_string())),
            None => Err(PowerError::UnknownSession(id.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use berth_server::{ErrorCode, ServiceError};

    use super::*;

    fn info(id: &str) -> SessionInfo {
        SessionInfo {
            id: id.into(),
            run_id: "run".into(),
            devices: vec![0],
            rate_hz: 100.0,
            idle_baseline: Duration::ZERO,
            started_at: Duration::ZERO,
        }
    }

    fn open(id: &str) -> OpenSession {
        OpenSession {
            info: info(id),
            recorder: Arc::new(Recorder::new(&[], 100.0, Duration::ZERO, false, 10)),
            ended: CancellationToken::new(),
        }
    }

    fn stopped(id: &str) -> StoppedSession {
        StoppedSession {
            info: info(id),
            stopped_at: Duration::ZERO,
            devices: Vec::new(),
            series: Arc::default(),
            truncated: false,
        }
    }

    fn code<T>(result: Result<T, PowerError>) -> ErrorCode {
        result.err().expect("an error").error_code()
    }

    #[test]
    fn open_sessions_are_bounded() {
        let mut sessions = Sessions::new(2, 2);
        sessions.insert_open(open("a")).unwrap();
        sessions.insert_open(open("b")).unwrap();
        let error = sessions.insert_open(open("c")).unwrap_err();
        assert_eq!(error.error_code(), ErrorCode::ResourceExhausted);
        assert!(error.to_string().contains("limit is 2"));
        sessions.take_open("a").unwrap();
        sessions.insert_open(open("c")).unwrap();
        assert_eq!(sessions.open_count(), 2);
    }

    #[test]
    fn asking_the_wrong_state_says_which_it_is() {
        let mut sessions = Sessions::new(4, 4);
        sessions.insert_open(open("a")).unwrap();
        assert_eq!(code(sessions.stopped("a")), ErrorCode::FailedPrecondition);
        let a = sessions.take_open("a").unwrap();
        sessions.insert_stopped(stopped(&a.info.id));
        assert_eq!(code(sessions.take_open("a")), ErrorCode::FailedPrecondition);
        assert!(
            sessions
                .take_open("a")
                .err()
                .unwrap()
                .to_string()
                .contains("already stopped")
        );
        assert_eq!(code(sessions.open("a")), ErrorCode::FailedPrecondition);
        assert_eq!(code(sessions.take_open("zz")), ErrorCode::NotFound);
        assert_eq!(code(sessions.stopped("zz")), ErrorCode::NotFound);
    }

    #[test]
    fn the_oldest_stopped_session_is_forgotten_first() {
        let mut sessions = Sessions::new(4, 2);
        for id in ["a", "b", "c"] {
            sessions.insert_stopped(stopped(id));
        }
        assert_eq!(code(sessions.stopped("a")), ErrorCode::NotFound);
        assert!(sessions.stopped("b").is_ok() && sessions.stopped("c").is_ok());
    }
}
