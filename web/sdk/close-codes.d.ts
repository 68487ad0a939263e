// Types of close-codes.js, which `python -m shared.exceptions` generates from the catalogue.

import type { ClosePolicy } from './tokenwire.js';

export const CLOSE_CODES: Readonly<{
  /** The policy of a code the table does not name. */
  default: ClosePolicy;
  /** By close code (as a string): its name in the catalogue and what a client does after it. */
  codes: Readonly<Record<string, { name: string; policy: ClosePolicy }>>;
}>;
