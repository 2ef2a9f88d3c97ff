-- Argo CD health check for backfill.dev/Backfill.
-- Install: argocd-cm key `resource.customizations.health.backfill.dev_Backfill` (see docs/argocd/).
-- Progressing while Pending/Running or while the operator has not yet observed the latest spec;
-- Suspended when Paused; Healthy when Succeeded; Degraded when Failed or Stalled.
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function progress_text(status)
  local p = status.progress
  if p == nil or p.percent == nil then
    return ""
  end
  local text = " (" .. tostring(math.floor(p.percent)) .. "%"
  if p.eta ~= nil and p.eta ~= "" then
    text = text .. ", ETA " .. p.eta
  end
  return text .. ")"
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the backfill operator to pick this Backfill up"
  return hs
end

-- A failure or a stall (invalid spec, immutable field changed) wins over everything else:
-- the operator may never observe a newer generation of a spec it rejects.
local stalled = condition(status, "Stalled")
if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = status.message or "Backfill failed"
  return hs
end
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = stalled.message or status.message or ("Stalled: " .. tostring(stalled.reason))
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(math.floor(generation))
  return hs
end

if status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = status.message or "Backfill completed"
  return hs
end
if status.phase == "Paused" then
  hs.status = "Suspended"
  hs.message = (status.message or "Backfill paused (spec.suspend is true)") .. progress_text(status)
  return hs
end
if status.phase == "Pending" or status.phase == "Running" then
  hs.status = "Progressing"
  hs.message = (status.message or ("Backfill " .. status.phase)) .. progress_text(status)
  return hs
end

hs.status = "Progressing"
hs.message = status.message or "Waiting for the backfill operator"
return hs
