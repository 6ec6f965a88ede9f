function (newDoc, oldDoc, userCtx, secObj) {
__PREAMBLE__
  var id = String(newDoc._id);
  function starts(text, prefix) { return text.slice(0, prefix.length) === prefix; }
  function ends(text, suffix) { return text.slice(text.length - suffix.length) === suffix; }
  // A lease changes hands only when it is free, lives at most its ttl, and
  // only its holder deletes it (see himbeere/lease.py).  Times are the
  // server's: Date.now() works in pouchdb-server's and CouchDB's engines.
  function lease() {
    var MAX_TTL = __LEASE_MAX_TTL__, SLACK = __LEASE_CLOCK_SLACK__;
    var now = Date.now() / 1000;
    function num(x) { return typeof x === 'number' && isFinite(x); }
    function held(holder) { return holder !== null && holder !== undefined; }
    function ours(holder) {
      return held(holder) && (String(holder) === me || starts(String(holder), me + ':'));
    }
    var old = oldDoc && !oldDoc._deleted ? oldDoc : null;
    var oldHolder = old ? old.holder : null;
    if (newDoc._deleted) {
      // On CouchDB a deletion carries only _id, _rev and _deleted.
      if (old && !ours(oldHolder)) {
        refuse('node ' + me + ' may delete only a lease it holds; ' + id + ' is held by ' +
               oldHolder);
      }
      return;
    }
    if (held(newDoc.holder) && !ours(newDoc.holder)) {
      refuse('node ' + me + ' may take a lease only in its own name, not ' + newDoc.holder);
    }
    if (old && held(oldHolder) && !ours(oldHolder) && num(old.expires) && old.expires > now) {
      refuse('node ' + me + ' may not take ' + id + ': ' + oldHolder + ' holds it until ' +
             old.expires + ' (server clock now ' + now + '); a lease changes hands only ' +
             'when it is free or expired');
    }
    var ttl = MAX_TTL;
    if (newDoc.ttl !== undefined) {
      if (!num(newDoc.ttl) || newDoc.ttl <= 0 || newDoc.ttl > MAX_TTL) {
        refuse('lease ttl ' + newDoc.ttl + ' is not allowed; allowed: seconds > 0, at most ' +
               MAX_TTL);
      }
      ttl = newDoc.ttl;
    }
    if (newDoc.expires === undefined && !held(newDoc.holder)) { return; }
    if (!num(newDoc.expires)) {
      refuse('lease expires ' + newDoc.expires + ' is not allowed; allowed: a number, ' +
             'seconds since 1970 on the server clock');
    }
    if (newDoc.expires > now + ttl + SLACK) {
      refuse('lease expires ' + newDoc.expires + ' is too far ahead; allowed: at most ' +
             'its ttl (' + ttl + ' s) + ' + SLACK + ' s after the server clock (now ' + now + ')');
    }
  }
  var own = id === 'status:' + me || starts(id, 'status:' + me + ':') ||
    starts(id, 'log:' + me + ':') || (starts(id, 'result:') && ends(id, ':' + me)) ||
    id === 'history:' + me;
  // Shared by design: every node contends for leases, and a program's state
  // follows it from node to node.  A node takes a lease in its own name only.
  // A staged rollout is driven by the scheduler, which is a node: nodes may
  // move an existing one on, never create or delete one, nor change what the
  // deployer wrote (see himbeere/fleet/rollout.py).
  function rollout() {
    if (!oldDoc || oldDoc._deleted || newDoc._deleted) {
      refuse('node ' + me + ' may not create or delete ' + id + '; a deployer pushes rollouts');
    }
    var fixed = ['type', 'name', 'release', 'previous_release', 'docs', 'waves', 'healthy_for', 'kind',
                 'created', 'created_by'];
    for (var i = 0; i < fixed.length; i++) {
      if (JSON.stringify(newDoc[fixed[i]]) !== JSON.stringify(oldDoc[fixed[i]])) {
        refuse('node ' + me + ' may not change ' + fixed[i] + ' of ' + id);
      }
    }
  }
  var shared = starts(id, 'state:') || starts(id, 'lease:') || starts(id, 'rollout:');
  if (!own && !shared) {
    refuse('node ' + me + ' may only write status:' + me + ', log:' + me + ':..., result:...:' +
           me + ', history:' + me + ', state:..., lease:..., rollout:... here, not ' + id);
  }
  if (starts(id, 'lease:')) { lease(); }
  if (starts(id, 'rollout:')) { rollout(); }
  if (!newDoc._deleted && newDoc.node !== undefined && String(newDoc.node) !== me) {
    refuse('node ' + me + ' may not write node: ' + newDoc.node);
  }
}
