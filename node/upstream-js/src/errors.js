// The SDK's errors; every one derives from PmlbError.

export class PmlbError extends Error {}
/** The mark's outgoing queue is full: its client is not reading. */
export class BackpressureError extends PmlbError {}
/** The mark is closed, or not reachable from this upstream. */
export class MarkGone extends PmlbError {}
/** A payload over the node's maxFrame for this mark: the node would not deliver it. */
export class FrameTooLarge extends PmlbError {}
/** Metadata that would take the mark past the node's maxMeta. */
export class MetadataTooLarge extends PmlbError {}

/**
 * The node did not accept a push: `reason` is the node's word ("not_permitted":
 * this upstream is not in the node's --push-upstreams; "payload_too_large"),
 * or "unconfirmed" when the link ended before the node confirmed it (it may
 * or may not have been delivered).
 */
export class PushRefused extends PmlbError {
  constructor(reason, detail = '') {
    super(`push not accepted: ${reason}${detail ? ` (${detail})` : ''}`);
    this.reason = reason;
    this.detail = detail;
  }
}
