"""Concurrent requests for one model share the hop to it: one handle call carries several requests.

Every handle call costs CPU on both sides of the hop whatever it carries (Serve's router, the gRPC call, the replica's
request wrapping: BENCHMARKS.md's profiles put Serve's share of a tiny request at a few milliseconds of Python in
each process), while the model replica already merges whatever piles up for its engine. So, per gateway replica,
per model and method (and per call options: the batch runner's background calls never share a call with online
ones, and they run in another process anyway):

- a request that finds no call to its model in flight (fewer than `max_calls_in_flight`) is sent at once, alone, in
  its own task (exactly the single call the gateway made before this module existed);
- a request that comes while a call is in flight waits here until a call to that model returns, or `max_wait_ms`,
  or until `max_items` requests wait; then the waiting requests go together in one call of the replica's
  `serve_group`, which runs each through the same method a single call takes and answers one outcome per request
  (serve_app/replica/deployment.py). A request that finds a group forming but is alone when it goes is sent alone.

Each request keeps its own fate: `SharedCall` (and `LoneCall`) behaves, for the request that awaits it, like the
DeploymentResponse of a single call (serve_app/gateway/handling.py's retries, deadlines and error kinds work on it
unchanged):
- its answer, or its own error (a ServingError the replica raised for it alone, re-raised here), or the group's
  failure (a replica that died, a full queue), which each request then handles as its own single call would: a
  retry (a new SharedCall), a 503, ...; a request the replica sent back because it already held
  max_ongoing_requests is sent alone, through Serve's queue, as it would have been without sharing;
- cancellation: a request cancelled while it waits here (its client disconnected, its deadline passed) leaves the
  group before it is sent, so no model work is done for it; one cancelled after the group was sent is dropped
  from it (its answer is thrown away, and it is never billed: billing happens in the request, after its answer);
  a group whose requests are all gone is cancelled. Group calls are made outside any request's Serve context, so
  Serve's cancel-with-the-parent does not take a whole group down when one of its requests goes.

Only small requests share a hop (MAX_SHARED_TEXTS, MAX_SHARED_CHARS): a large request's cost is its model work, and
a group of large ones would make one large message (Serve's gRPC transport has a 1 GiB limit, config.py). Only models
whose replicas describe themselves with `serves_groups` get groups: those with serve_group and a fixed replica count
or the queued-work autoscaling policy (Serve's request-count policy counts handle calls, where a group counts once;
serve_app/replica/deployment.py `describe`).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.serve.exceptions import RequestCancelledError

from serve_app.config import HopSharingConfig

# A request with more texts or characters than these is always sent alone (see the module docstring). 64 Ki characters
# are over ten thousand tokens: far past the small requests whose hop dominates their cost, and 32 of them make a
# message of about 2 MiB.
MAX_SHARED_TEXTS = 256
MAX_SHARED_CHARS = 64 * 1024


def payload_size(args: tuple) -> tuple[int, int]:
    """(texts, characters) of a rerank or embed call's arguments: strings count their characters, lists of strings
    (documents, inputs) or of token-id lists count their items and lengths."""
    texts = chars = 0
    for arg in args:
        if isinstance(arg, str):
            texts, chars = texts + 1, chars + len(arg)
        elif isinstance(arg, list):
            texts += len(arg)
            chars += sum(len(item) if isinstance(item, (str, list)) else 1 for item in arg)
    return texts, chars


def shareable(args: tuple) -> bool:
    texts, chars = payload_size(args)
    return texts <= MAX_SHARED_TEXTS and chars <= MAX_SHARED_CHARS


def detached_context() -> contextvars.Context:
    """A copy of the current context with no Serve request in it: a handle call made in it is nobody's child, so
    Serve does not cancel it when the request that happened to send it is cancelled (ray.serve.context tracks child
    calls by the request context in force when they are made)."""
    from ray.serve.context import _unset_request_context

    context = contextvars.copy_context()
    context.run(_unset_request_context)
    return context


WAITING, SENT, DONE, GONE = "waiting", "sent", "done", "gone"


@dataclass(eq=False)
class SharedCall:
    """One request's call as the hop sharer carries it: awaitable for its answer, cancellable on its own."""

    lane: Lane
    args: tuple
    context: contextvars.Context  # the request's own: a call that carries only this request is made in it
    future: asyncio.Future
    state: str = WAITING
    call: Call | None = None

    def __await__(self):
        return self.future.__await__()

    def cancel(self) -> None:
        """This request no longer wants its answer (disconnected, timed out, its model removed)."""
        state, self.state = self.state, GONE
        if state == WAITING:
            self.lane.leave(self)
        elif state == SENT and self.call is not None:
            self.call.leave()
        if not self.future.done():
            self.future.cancel()

    @property
    def live(self) -> bool:
        return self.state in (WAITING, SENT)

    def resolve(self, result: Any) -> None:
        if self.state == SENT and not self.future.done():
            self.state = DONE
            self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        if self.state == SENT and not self.future.done():
            self.state = DONE
            if isinstance(error, asyncio.CancelledError):
                # Not an exception a future can carry: this request's call was cancelled under it.
                error = RequestCancelledError()
            self.future.set_exception(error)


class LoneCall:
    """A request's own call, made at once because nothing was in flight: its DeploymentResponse, which tells the lane
    when it ends (answered, failed or cancelled), exactly once."""

    __slots__ = ("lane", "response", "ended")

    def __init__(self, lane: Lane, response):
        self.lane, self.response, self.ended = lane, response, False

    def __await__(self):
        return self._answer().__await__()

    async def _answer(self):
        try:
            return await self.response
        finally:
            self._end()

    def cancel(self) -> None:
        self.response.cancel()
        self._end()  # also when the awaiting task was cancelled before it ever started

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.lane.finished()


@dataclass(eq=False)
class Call:
    """One handle call in flight: a single request's, or a group's."""

    members: list[SharedCall]
    response: Any = None  # the DeploymentResponse, once made

    def leave(self) -> None:
        if self.response is not None and not any(member.live for member in self.members):
            self.response.cancel()  # nobody waits for its answer: free the model's work


@dataclass(eq=False)
class Lane:
    """Calls to one model's method with one set of call options, from this gateway replica."""

    sharer: HopSharer
    key: tuple
    single: Any  # the handle method of a single call (entry.method(name))
    group: Any  # the handle method `serve_group`
    method: str
    options: dict[str, Any]
    in_flight: int = 0
    waiting: list[SharedCall] = field(default_factory=list)
    timer: Any = None  # the max_wait_ms timer (an asyncio.TimerHandle) while requests wait

    def send(self, args: tuple) -> LoneCall | SharedCall:
        if self.in_flight < self.sharer.config.max_calls_in_flight and not self.waiting:
            # Nothing to wait for: the request's own call, made here, in its own task, as without sharing.
            response = self.single.remote(*args, **self.options)
            self.in_flight += 1
            self.sharer.stats["calls"] += 1
            return LoneCall(self, response)
        loop = asyncio.get_running_loop()
        request = SharedCall(self, args, contextvars.copy_context(), loop.create_future())
        self.waiting.append(request)
        if len(self.waiting) >= self.sharer.config.max_items:
            self.flush()
        elif self.timer is None:
            self.timer = self.sharer.call_later(self.sharer.config.max_wait_ms / 1000, self.flush)
        return request

    def leave(self, request: SharedCall) -> None:
        self.waiting.remove(request)
        if not self.waiting and self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.sharer.forget_if_idle(self)

    def flush(self) -> None:
        """Send whatever waits, now."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.waiting:
            group, self.waiting = self.waiting, []
            self.start(group)

    def start(self, requests: list[SharedCall]) -> None:
        call = Call(requests)
        for request in requests:
            request.state, request.call = SENT, call
        self.in_flight += 1
        # A single request's call is made in its own context, as without sharing (its Serve request id reaches the
        # model's logs, and Serve cancels it with its request); a group's in none (detached_context says why).
        context = requests[0].context if len(requests) == 1 else detached_context()
        task = asyncio.get_running_loop().create_task(self.run(call), context=context)
        task.add_done_callback(lambda _: self.finished())

    async def run(self, call: Call) -> None:
        # Requests cancelled since start() (this task runs on the loop's next turn) are left out before sending.
        call.members = [request for request in call.members if request.live]
        if not call.members:
            return
        single = len(call.members) == 1
        self.sharer.stats["calls"] += 1
        if not single:
            self.sharer.stats["groups"] += 1
            self.sharer.stats["grouped_requests"] += len(call.members)
        try:
            if single:
                call.response = self.single.remote(*call.members[0].args, **self.options)
            else:
                call.response = self.group.remote(self.method, [list(m.args) for m in call.members], **self.options)
            answer = await call.response
        except BaseException as exc:  # noqa: BLE001 - the call's failure is each of its requests' own
            for request in call.members:
                request.fail(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if single:
            call.members[0].resolve(answer)
            return
        for request, outcome in zip(call.members, answer):
            if outcome is None and request.state == SENT:
                # The replica was full (serve_group): this request goes alone, as it would have without sharing.
                self.sharer.stats["sent_back"] += 1
                request.state, request.call = WAITING, None
                self.start([request])
            elif isinstance(outcome, BaseException):
                request.fail(outcome)
            else:
                request.resolve(outcome)

    def finished(self) -> None:
        """A call returned: the model has room again, so whatever gathered meanwhile goes now."""
        self.in_flight -= 1
        if self.waiting:
            self.flush()
        else:
            self.sharer.forget_if_idle(self)


class HopSharer:
    """The lanes of one carrier (a gateway replica, a batch runner replica), by model, method and call options."""

    def __init__(self, config: HopSharingConfig, call_later: Callable[[float, Callable[[], None]], Any] | None = None):
        """`call_later(seconds, callback)` starts the max_wait_ms timer and returns something with cancel(): the
        running loop's own by default; tests pass one they fire themselves, so no test depends on the clock."""
        self.config = config
        self.call_later = call_later or (lambda delay, callback: asyncio.get_running_loop().call_later(delay, callback))
        self._lanes: dict[tuple, Lane] = {}
        # calls: handle calls made; groups / grouped_requests: the calls that carried several requests, and those
        # requests; sent_back: requests a full replica returned, then sent alone.
        self.stats = {"calls": 0, "groups": 0, "grouped_requests": 0, "sent_back": 0}

    def send(self, entry, method: str, args: tuple, options: dict[str, Any]) -> LoneCall | SharedCall:
        """Send `entry`'s `method(*args, **options)` now, or with the requests that gather while a call to it is in
        flight. Call from the request's own task (its context is the single call's)."""
        key = (entry.app_name, entry.deployed_at, method, tuple(sorted(options.items())))
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(self, key, entry.method(method), entry.method("serve_group"), method,
                                           options)
        return lane.send(args)

    def forget_if_idle(self, lane: Lane) -> None:
        """Drop a lane with nothing in flight or waiting: a redeployed model gets new ones (its entry changes)."""
        if lane.in_flight == 0 and not lane.waiting and self._lanes.get(lane.key) is lane:
            del self._lanes[lane.key]
